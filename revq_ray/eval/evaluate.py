"""Evaluate a trained tokenizer: latent, decoded (image / audio) and codebook metrics, plus a report.

    python -m revq_ray.eval --model runs/quickstart/train --input runs/quickstart/photos/val \\
        --output runs/quickstart/eval

``--model`` is an export (``save_pretrained`` dir), a training run directory (``export/best`` is used) or a
Tokenizer bundle. ``--input`` is latent shards (a directory with ``manifest.json``) or raw media: an image
folder/file, an IDX file (``*-idx3-ubyte[.gz]``) or an audio folder/file. The VAE comes from ``--vae``, else
from the bundle, else from the run's saved config, else from the shards' manifest. With latent shards alone
the originals are unknown, so decoded metrics compare the tokenized decode with the VAE-only decode.

rFID and LPIPS (images) and PESQ (speech) come from :mod:`revq_ray.eval.perceptual` whenever their weights
are available (``--metric-weights DIR``, the torch hub cache, or a download unless ``--no-download`` /
``REVQ_OFFLINE=1``); a note says what is missing otherwise. ``--no-perceptual`` skips all three.

Writes ``metrics.json``, ``report.md`` and figures (``grid.png``, ``usage.png``, ``curves.png`` when the run
has a metrics CSV, and for audio ``mel.png`` plus original / VAE-only / tokenized ``.wav`` files). Audio files
are scored whole: every window of the clip length the model was trained on, reassembled at full length
(:mod:`revq_ray.audio_tokens`), one row per file under ``files`` in ``metrics.json`` and in the report.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revq_ray.core import metrics as M
from revq_ray.eval import report as R
from revq_ray.eval.inputs import EvalInput, detect_kind, read_audio, read_images, read_latents
from revq_ray.eval.perceptual import LPIPS_MIN_SIZE, Perceptual, frechet_distance
from revq_ray.vae.audio import save_wav

NO_PERCEPTUAL_NOTE = "rFID, LPIPS and PESQ were not computed (--no-perceptual)."


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def _resolve_vae_spec(
    vae: str | None, model_path: Path, model_dir: Path, data: EvalInput | None
) -> tuple[str | None, str]:
    """(spec, where it came from)."""
    import json

    from revq_ray.tokenizer import CONFIG_NAME, Tokenizer, vae_spec_from_run

    if vae:
        return vae, "--vae"
    bundle_cfg = model_path / CONFIG_NAME
    if bundle_cfg.is_file():
        return Tokenizer.absolute_spec(
            json.loads(bundle_cfg.read_text())["vae"], model_path
        ), "tokenizer bundle"
    spec = vae_spec_from_run(model_dir)
    if spec:
        return spec, "run config"
    if data is not None and data.vae_spec and data.vae_spec != "synthetic":
        return data.vae_spec, "shard manifest"
    return None, ""


@dataclass
class _Eval:
    """What one evaluation works on, shared by its steps."""

    net: Any  # ReVQModel
    tok: Any  # Tokenizer, or None (latent shards without a VAE: latent metrics only)
    data: EvalInput
    kind: str  # detect_kind(input)
    spec: str | None
    model_dir: Path
    run_dir: Path | None
    out_dir: Path
    dev: torch.device
    batch_size: int
    log: Callable[[str], None]
    t0: float
    notes: list[str] = field(default_factory=list)
    x_in: torch.Tensor | None = None  # VAE inputs of the originals (images / every audio window)
    windows: list[int] | None = None  # audio files: windows per file (x_in rows, in order)
    perc: Perceptual | None = None  # rFID / LPIPS / PESQ; None: --no-perceptual


def evaluate(
    model: str | Path,
    input: str | Path,
    output: str | Path,
    vae: str | None = None,
    limit: int | None = 512,
    batch_size: int = 64,
    device: str = "cpu",
    grid_items: int = 8,
    audio_items: int = 3,
    run_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    vocoder: str | None = None,
    perceptual: bool = True,
    metric_weights: str | Path | None = None,
    download: bool = True,
    pesq_mode: str = "wb",
) -> dict[str, Any]:
    """Evaluate ``model`` on ``input``; write metrics.json, report.md and figures to ``output``.

    Returns the metrics dict (also written to ``<output>/metrics.json``). ``limit`` caps the items read
    (None = all); ``run_dir`` overrides where training curves are read from. Audio files are scored whole
    (every window, reassembled at full length) and listed one by one under ``files``; ``vocoder`` overrides
    the mel VAE's vocoder (``griffin-lim`` or ``vocos:<dir-or-id>``).

    ``perceptual``: rFID and LPIPS for images, PESQ (``pesq_mode`` ``"wb"`` or ``"nb"``) for audio. Their
    weights come from ``metric_weights`` (a directory holding the files under their standard names), the
    torch hub cache, or a download when ``download`` is true and ``REVQ_OFFLINE`` is not set; a metric whose
    weights are missing is left out with a note (see :mod:`revq_ray.eval.perceptual`).
    """
    ev = _setup(model, input, output, vae, limit, device, run_dir, log, vocoder)
    ev.batch_size = batch_size
    if perceptual:
        ev.perc = Perceptual(metric_weights, download, ev.dev, batch_size, pesq_mode, log=log)
    _encode_media(ev)
    q = _quantize(ev)
    result, summary = _latent_and_usage(ev, q)
    figures: dict[str, str] = {}
    if ev.tok is not None:
        _decoded_metrics(ev, q, result, summary, figures, grid_items, audio_items)
    return _finish(ev, result, summary, figures)


def _setup(model, input, output, vae, limit, device, run_dir, log, vocoder) -> _Eval:
    """Load the model, find and load its VAE, read the input."""
    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import Tokenizer, image_resize_of, local_model_path, resolve_model_dir, run_dir_of
    from revq_ray.vae import load_vae_for

    t0 = time.perf_counter()
    dev = _pick_device(device)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = local_model_path(model)  # a URI (s3://...) is downloaded once, here
    model_dir = resolve_model_dir(model_path)
    net = ReVQModel.from_pretrained(str(model_dir)).to(dev).eval()
    if run_dir is None:
        run_dir = model_path if (model_path / "export").is_dir() else run_dir_of(model_dir)
    log(f"[eval] model {model_dir} ({net.cfg.quantizer.type}, T={net.tokens}, K={net.codebook_size})")
    kind = detect_kind(input)
    notes: list[str] = []
    data: EvalInput | None = read_latents(input, limit) if kind == "latents" else None
    spec, spec_from = _resolve_vae_spec(vae, model_path, model_dir, data)
    tok: Tokenizer | None = None
    if spec:
        try:
            tok = Tokenizer(load_vae_for(spec, net.latent_shape, dev), net, spec, vocoder=vocoder)
            tok.image_resize = image_resize_of(model_path)  # e.g. center_crop for imported published models
            log(f"[eval] VAE {spec} (from {spec_from})")
        except Exception as err:
            if kind != "latents":
                raise
            notes.append(
                f"VAE {spec!r} could not be loaded ({type(err).__name__}: {err}); latent metrics only."
            )
    if tok is None and kind != "latents":
        raise ValueError(
            f"--input {input} is raw media, which needs a VAE: pass --vae SPEC "
            "(e.g. builtin:<dir>, taesd:<dir>), "
            "or evaluate a Tokenizer bundle / a run whose config names its VAE"
        )
    if tok is None:
        notes.append(
            "No VAE available (pass --vae SPEC): decoded-image/audio metrics skipped, latent metrics only."
        )
    if kind in ("idx", "images"):
        data = read_images(input, limit)
    elif kind == "audio":
        if tok.modality != "audio":
            raise ValueError(f"--input {input} is audio but the VAE {spec!r} is an {tok.modality} VAE")
        data = read_audio(input, tok.sample_rate, limit)
    assert data is not None
    log(f"[eval] {len(data)} items from {data.source} ({kind}); {len(data.skipped)} skipped")
    if data.skipped:
        notes.append(f"{len(data.skipped)} unreadable input entries were skipped (e.g. {data.skipped[0]}).")
    return _Eval(net, tok, data, kind, spec, model_dir, run_dir, out_dir, dev, 64, log, t0, notes)


def _encode_media(ev: _Eval) -> None:
    """Media -> VAE inputs (``ev.x_in``; audio: every window of every file) -> latents (``ev.data``)."""
    tok, data = ev.tok, ev.data
    if ev.kind != "latents":
        if tok.modality == "audio":
            wins, _, _ = tok.audio_windows(data.waves, tok.sample_rate)
            ev.windows = [len(w) for w in wins]
            ev.x_in = torch.cat(wins)
        else:
            ev.x_in = tok.preprocess(data.images)
        use_post = ev.net.cfg.quantizer.type == "gq" and getattr(tok.vae, "is_gaussian", False)
        zs, lvs = [], []
        for sl in _batches(ev.x_in.shape[0], ev.batch_size):
            xb = ev.x_in[sl].to(ev.dev)
            if use_post:
                post = tok.vae.posterior(xb)
                zs.append(post.mean.cpu())
                lvs.append(post.logvar.cpu())
            else:
                zs.append(tok.vae.encode(xb).cpu())
        data.latents = torch.cat(zs)
        data.logvars = torch.cat(lvs) if lvs else None
        ev.log(f"[eval] encoded {ev.x_in.shape[0]} VAE inputs ({time.perf_counter() - ev.t0:.1f}s)")
    if ev.net.cfg.quantizer.type == "gq" and data.logvars is None:
        ev.notes.append(
            "GQ without log-variances (deterministic VAE or shards without logvar): posterior-free scoring."
        )


def _quantize(ev: _Eval) -> dict[str, torch.Tensor]:
    """Every latent through quantizer + rectifier: ids, rectified latents, and the standardized views."""
    data, net = ev.data, ev.net
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "rec", "q_std", "r_std", "z_std")}
    with torch.no_grad():
        for sl in _batches(data.latents.shape[0], ev.batch_size):
            lv = data.logvars[sl].to(ev.dev) if data.logvars is not None else None
            out = net(data.latents[sl].to(ev.dev), lv)
            parts["ids"].append(out.ids_bt.cpu())
            parts["rec"].append(out.latents_rec.cpu())
            parts["q_std"].append(out.quantized.cpu())
            parts["r_std"].append(out.rectified_std.cpu())
            parts["z_std"].append(out.latents_std.cpu())
    q = {k: torch.cat(v) for k, v in parts.items()}
    q["q_raw"] = net.standardizer.inverse(q["q_std"].to(ev.dev)).cpu()
    return q


def _latent_and_usage(ev: _Eval, q: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latent MSEs, codebook usage on the evaluation set and the run's info block."""
    net, z_all = ev.net, ev.data.latents
    st = net.standardizer
    if getattr(st, "weighted", False):
        # model.weighting=decoder: the model's own units weigh channels by the decoder's sensitivity. The
        # "std" figures stay plain z-scores (comparable with unweighted models); the weighted ones are extra.
        mean, std = st.mean.cpu(), st.std.cpu()
        plain = {k: (q[k] - mean) / std for k in ("q_raw", "rec")}
        z_plain = (z_all.to(mean.dtype) - mean) / std
        latent = {
            "mse_std_without_rectifier": M.mse(plain["q_raw"], z_plain).item(),
            "mse_std_with_rectifier": M.mse(plain["rec"], z_plain).item(),
            "mse_weighted_without_rectifier": M.mse(q["q_std"], q["z_std"]).item(),
            "mse_weighted_with_rectifier": M.mse(q["r_std"], q["z_std"]).item(),
        }
    else:
        latent = {
            "mse_std_without_rectifier": M.mse(q["q_std"], q["z_std"]).item(),
            "mse_std_with_rectifier": M.mse(q["r_std"], q["z_std"]).item(),
        }
    latent.update(
        {
            "mse_raw_without_rectifier": M.mse(q["q_raw"], z_all).item(),
            "mse_raw_with_rectifier": M.mse(q["rec"], z_all).item(),
            "note": "std = per-element standardized units (the paper's latent MSE); raw = the VAE's own units"
            + ("; weighted = the model's decoder-weighted units (model.weighting)" if st.weighted else ""),
        }
    )
    n = len(ev.data.waves) if ev.data.waves is not None else len(ev.data)  # files, not windows
    info: dict[str, Any] = {
        "model": str(ev.model_dir),
        "vae": ev.spec or "",
        "input": str(ev.data.source),
        "input_kind": ev.kind,
        "items": n,
        "modality": ev.tok.modality if ev.tok else "latent",
        "quantizer": net.cfg.quantizer.type,
        "rectifier": net.cfg.rectifier.type,
        "tokens": net.tokens,
        "codebook_size": net.codebook_size,
        "latent_shape": list(net.latent_shape),
        "bits_per_sample": net.bits_per_sample,
    }
    if ev.windows is not None:
        info["windows"] = int(sum(ev.windows))
    result: dict[str, Any] = {"info": info, "latent": latent, "usage": _usage(ev, q["ids"])}
    summary: dict[str, Any] = {
        "items": n,
        "bits_per_sample": net.bits_per_sample,
        "latent_mse_std_without_rectifier": latent["mse_std_without_rectifier"],
        "latent_mse_std_with_rectifier": latent["mse_std_with_rectifier"],
    }
    return result, summary


def _usage(ev: _Eval, ids_nt: torch.Tensor) -> dict[str, Any]:
    net = ev.net
    usage = M.usage_stats(ids_nt, net.codebook_size)
    out: dict[str, Any] = {
        "mean_usage": usage["mean_usage"],
        "mean_perplexity": usage["mean_perplexity"],
        "perplexity_over_K": usage["mean_perplexity"] / net.codebook_size,
        "mean_entropy_nats": usage["mean_entropy"],
        "entropy_bits": usage["entropy_bits"],
        "max_entropy_bits": math.log2(net.codebook_size),
        "dead_codes_total": int(usage["dead"].sum()),
        "per_group": {
            "usage": usage["usage"].tolist(),
            "perplexity": usage["perplexity"].tolist(),
            "entropy_nats": usage["entropy"].tolist(),
            "dead": usage["dead"].tolist(),
        },
        "note": f"over the {ids_nt.shape[0]} evaluated latents only: with few, many codes are unused by "
        "construction",
        "counts": M.code_counts(ids_nt, net.codebook_size),
    }
    try:
        train = {k: v.tolist() if torch.is_tensor(v) else v for k, v in net.quantizer.usage_stats().items()}
    except Exception as err:  # pragma: no cover - informative only
        ev.notes.append(f"quantizer.usage_stats() failed: {err}")
        train = {}
    if train:
        out["training_counters"] = train
    return out


def _decoded_metrics(ev, q, result, summary, figures, grid_items, audio_items) -> None:
    """Decode VAE-only and tokenized latents; image or audio metrics and figures."""
    tok, bits = ev.tok, ev.net.bits_per_sample
    info = result["info"]
    if tok.modality == "audio" and ev.windows is not None:
        _audio_files(ev, q, result, summary, figures, audio_items)
        seconds = sum(w.numel() for w in ev.data.waves) / tok.sample_rate
        info["bits_per_second"] = bits * info["windows"] / seconds
        summary["bits_per_second"] = info["bits_per_second"]
        return
    x_vae, x_tok, x_q = (_decode_all(ev, z) for z in (ev.data.latents, q["rec"], q["q_raw"]))
    ev.log(f"[eval] decoded VAE-only and tokenized reconstructions ({time.perf_counter() - ev.t0:.1f}s)")
    if tok.modality == "image":
        _image_metrics(result, summary, figures, ev.notes, ev.out_dir, ev.x_in, x_vae, x_tok, x_q, grid_items)
        _perceptual_images(ev, result["image"], summary, x_vae, x_tok, x_q)
        h, w = x_vae.shape[-2:]
        info["bits_per_pixel"] = bits / (h * w)
        summary["bits_per_pixel"] = info["bits_per_pixel"]
    else:  # audio latent shards: one window each, no originals
        _audio_metrics(
            result, summary, figures, ev.notes, ev.out_dir, tok, None, x_vae, x_tok, None, audio_items, ev.log
        )
        info["bits_per_second"] = bits / (tok.clip_samples / tok.sample_rate)
        summary["bits_per_second"] = info["bits_per_second"]


def _decode_all(ev: _Eval, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [ev.tok.vae.decode(z[sl].to(ev.dev)).cpu() for sl in _batches(len(z), ev.batch_size)]
        )


def _finish(ev: _Eval, result: dict[str, Any], summary: dict[str, Any], figures: dict[str, str]) -> dict:
    """Usage and curve figures, metrics.json and report.md."""
    info, usage = result["info"], result["usage"]
    summary["usage_mean"] = usage["mean_usage"]
    summary["perplexity_over_K"] = usage["perplexity_over_K"]
    summary["entropy_bits_per_token"] = usage["entropy_bits"]
    counts = usage.pop("counts")
    title = f"{info['quantizer']} T={ev.net.tokens} K={ev.net.codebook_size}"
    figures["usage"] = R.save_usage(counts, ev.out_dir / "usage.png", title=title).name
    csv_path = R.find_metrics_csv(ev.run_dir)
    if csv_path is not None:
        p = R.save_curves(csv_path, ev.out_dir / "curves.png")
        if p is not None:
            figures["curves"] = p.name
            result["training_csv"] = str(csv_path)
    else:
        ev.notes.append("No training-metrics CSV found next to the model: curves.png not written.")
    if ev.tok is not None and ev.perc is None:
        ev.notes.append(NO_PERCEPTUAL_NOTE)
    elif ev.perc is not None:
        pesq_note = ev.perc.pesq_note()
        ev.notes += ev.perc.notes + ([pesq_note] if pesq_note else [])
    result.update(summary=summary, figures=figures, notes=ev.notes)
    result["seconds"] = round(time.perf_counter() - ev.t0, 2)
    R.write_json(ev.out_dir / "metrics.json", result)
    R.write_report(ev.out_dir, result, figures, ev.notes)
    ev.log(
        f"[eval] wrote {ev.out_dir / 'metrics.json'} and {ev.out_dir / 'report.md'} ({result['seconds']}s)"
    )
    return result


def _image_metrics(result, summary, figures, notes, out_dir, x_in, x_vae, x_tok, x_q, grid_items) -> None:
    img: dict[str, Any] = {}
    if x_in is not None:
        img["reference"] = "original images"
        for name, x in (("vae_only", x_vae), ("tokenized", x_tok), ("tokenized_without_rectifier", x_q)):
            img[name] = {"psnr": M.psnr(x, x_in).item(), "ssim": _ssim(x, x_in)}
        img["tokenized_vs_vae_only"] = {"psnr": M.psnr(x_tok, x_vae).item(), "ssim": _ssim(x_tok, x_vae)}
        summary["psnr_vae_only"] = img["vae_only"]["psnr"]
        summary["ssim_vae_only"] = img["vae_only"]["ssim"]
    else:
        img["reference"] = "VAE-only reconstructions (latent-shard input: originals unknown)"
        notes.append(
            "Input was latent shards, so the originals are unknown: image PSNR/SSIM compare the tokenized "
            "decode with the VAE-only decode (an upper bound on agreement, not a distance to real images)."
        )
        for name, x in (("tokenized", x_tok), ("tokenized_without_rectifier", x_q)):
            img[name] = {"psnr": M.psnr(x, x_vae).item(), "ssim": _ssim(x, x_vae)}
    summary["psnr_tokenized"] = img["tokenized"]["psnr"]
    summary["ssim_tokenized"] = img["tokenized"]["ssim"]
    summary["psnr_tokenized_without_rectifier"] = img["tokenized_without_rectifier"]["psnr"]
    result["image"] = img
    rows = []
    if x_in is not None:
        rows.append(("original", x_in))
    rows += [("VAE only", x_vae), ("tokenized", x_tok)]
    figures["grid"] = R.save_grid(rows, out_dir / "grid.png", max_cols=grid_items).name


def _perceptual_images(ev: _Eval, img: dict[str, Any], summary: dict[str, Any], x_vae, x_tok, x_q) -> None:
    """rFID and LPIPS of the reconstructions against the originals; with latent shards (originals unknown)
    of the tokenized decode against the VAE-only one, under ``*_tokenized_vs_vae_only`` summary keys.
    rFID skips ``tokenized_without_rectifier``: one more Inception pass, for little news."""
    pm = ev.perc
    if pm is None:
        return
    t = time.perf_counter()
    pm.load_image_nets()
    if pm.fid_net is None and pm.lpips_net is None:
        ev.log("[eval] rFID and LPIPS skipped: no weights (see the notes)")
        return
    if ev.x_in is not None:
        ref, suffix, names = ev.x_in, "", ("vae_only", "tokenized", "tokenized_without_rectifier")
    else:
        ref, suffix, names = x_vae, "_vs_vae_only", ("tokenized", "tokenized_without_rectifier")
    recs = {"vae_only": x_vae, "tokenized": x_tok, "tokenized_without_rectifier": x_q}
    f_ref = pm.features(ref)
    for name in names:
        lp = pm.lpips(recs[name], ref)
        if lp is not None:
            img[name]["lpips"] = lp
        if f_ref is not None and name != "tokenized_without_rectifier":
            img[name]["rfid"] = frechet_distance(pm.features(recs[name]), f_ref)
    for metric in ("rfid", "lpips"):
        for name in ("vae_only", "tokenized"):
            if metric in img.get(name, {}):
                summary[f"{metric}_{name}{suffix}"] = img[name][metric]
    n = int(ref.shape[0])
    img["perceptual"] = {"images": n, **pm.info}
    if pm.lpips_net is not None:
        img["perceptual"]["lpips_net"] = "alex (lpips v0.1)"
        img["perceptual"]["lpips_min_side"] = max(min(ref.shape[-2:]), LPIPS_MIN_SIZE)
    if f_ref is not None:
        img["perceptual"]["rfid_features"] = int(f_ref.shape[1])
        ev.notes.append(
            f"rFID over {n} images: FID is biased upward on small sets (roughly as 1/N), so compare it only "
            "with rFID over as many images, never with papers' 50,000-image numbers."
        )
    ev.log(f"[eval] rFID / LPIPS ({time.perf_counter() - t:.1f}s)")


def _audio_files(ev: _Eval, q, result, summary, figures, audio_items) -> None:
    """Audio files scored whole: every window decoded, reassembled by overlap-add and vocoded at the file's
    full length; metrics per file (``result["files"]``) and over all files."""
    tok, data, sr = ev.tok, ev.data, ev.tok.sample_rate
    mel = tok.input_kind == "mel"
    dec_vae = tok.decode_latent_windows(list(data.latents.split(ev.windows)), ev.batch_size)
    dec_tok = tok.decode_latent_windows(list(q["rec"].split(ev.windows)), ev.batch_size)
    ev.log(f"[eval] decoded {len(data.waves)} whole files ({time.perf_counter() - ev.t0:.1f}s); vocoding")
    files, mel_err = [], {"vae_only": [0.0, 0], "tokenized": [0.0, 0]}
    for i, wave in enumerate(data.waves):
        n = wave.numel()
        row: dict[str, Any] = {"name": data.names[i], "seconds": n / sr, "windows": ev.windows[i]}
        row["ids"] = ev.windows[i] * tok.tokens
        waves = {
            "vae_only": tok.audio.output_to_wave(dec_vae[i], n),
            "tokenized": tok.audio.output_to_wave(dec_tok[i], n),
        }
        if mel:
            mel_in = tok.vae.front_end(wave.to(ev.dev)).cpu()
            frames = mel_in.shape[-1]
            for name, y in (("vae_only", dec_vae[i]), ("tokenized", dec_tok[i])):
                err = (y[:, :frames] - mel_in).pow(2)
                row[f"mel_mse_{name}"] = err.mean().item()
                mel_err[name][0] += err.sum().item()
                mel_err[name][1] += err.numel()
            waves["vocoder_only"] = tok.postprocess(mel_in[None].to(ev.dev), length=n)[0].cpu()
            if i == 0:
                keep = 4 * int(tok.vae.input_shape[-1])  # at most 4 windows: a readable figure
                rows = [("original", mel_in[:, :keep]), ("VAE only", dec_vae[i][:, :keep])]
                rows.append(("tokenized", dec_tok[i][:, :keep]))
                figures["mel"] = R.save_mels(rows, ev.out_dir / "mel.png").name
        for name, w in waves.items():
            row[f"stoi_{name}"] = _stoi(wave[None], w[None].cpu(), sr)
            if ev.perc is not None:
                row[f"pesq_{name}"] = ev.perc.pesq([wave], [w.cpu()], sr)
            row[f"snr_db_{name}"] = M.snr(wave[None], w[None].cpu()).item()
        files.append(row)
        if i < audio_items:
            figures[f"original_{i}"] = save_wav(ev.out_dir / f"original_{i}.wav", wave, sr).name
            for name in ("vae_only", "tokenized"):
                figures[f"{name}_{i}"] = save_wav(ev.out_dir / f"{name}_{i}.wav", waves[name], sr).name
    result["files"] = files
    result["audio"] = {"reference": "original audio, whole files (every window, reassembled)"}
    for key in [k for k in files[0] if k.startswith(("stoi_", "pesq_", "snr_db_"))]:
        vals = [f[key] for f in files if not math.isnan(f[key])]
        summary[key] = result["audio"][key] = float(sum(vals) / len(vals)) if vals else math.nan
    for name, (total, count) in mel_err.items():
        if count:
            summary[f"mel_mse_{name}"] = result["audio"][f"mel_mse_{name}"] = total / count
    summary["seconds_of_audio"] = sum(f["seconds"] for f in files)
    if mel:
        ev.notes.append(
            f"Waveforms are vocoded from mels with {tok.vocoder.spec}; 'vocoder_only' (the original mel "
            "vocoded) is the ceiling any mel tokenizer can reach with it. Files are scored whole."
        )


def _ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    win = 11 if min(x.shape[-2:]) >= 11 else (min(x.shape[-2:]) // 2) * 2 - 1
    return M.ssim(x.clamp(0, 1), y.clamp(0, 1), window_size=max(win, 1)).item()


def _audio_metrics(
    result, summary, figures, notes, out_dir, tok, x_in, x_vae, x_tok, waves_in, audio_items, log
) -> None:
    aud: dict[str, Any] = {}
    if x_in is not None:
        f = min(x_in.shape[-1], x_vae.shape[-1], x_tok.shape[-1])
        mel_in, mel_vae, mel_tok = x_in[..., :f], x_vae[..., :f], x_tok[..., :f]
        aud["reference"] = "original audio (first clip of each file)"
        aud["mel_vae_only"] = {"mse": M.mse(mel_vae, mel_in).item(), "l1": M.mae(mel_vae, mel_in).item()}
        aud["mel_tokenized"] = {"mse": M.mse(mel_tok, mel_in).item(), "l1": M.mae(mel_tok, mel_in).item()}
    else:
        mel_in = None
        f = min(x_vae.shape[-1], x_tok.shape[-1])
        mel_vae, mel_tok = x_vae[..., :f], x_tok[..., :f]
        aud["reference"] = "VAE-only reconstructions (latent-shard input)"
        aud["mel_tokenized"] = {"mse": M.mse(mel_tok, mel_vae).item(), "l1": M.mae(mel_tok, mel_vae).item()}
    summary["mel_mse_tokenized"] = aud["mel_tokenized"]["mse"]
    if "mel_vae_only" in aud:
        summary["mel_mse_vae_only"] = aud["mel_vae_only"]["mse"]
    sr = tok.sample_rate
    if tok.input_kind == "mel":
        log("[eval] Griffin-Lim vocoding (original mel, VAE-only, tokenized) ...")
        w_vae = tok.postprocess(mel_vae)
        w_tok = tok.postprocess(mel_tok)
        w_gl = tok.postprocess(mel_in) if mel_in is not None else None
        notes.append(
            "Waveforms are vocoded from mels with Griffin-Lim (phase is re-estimated), so time-domain SNR "
            "is low even for a perfect mel; 'vocoder_only' (Griffin-Lim of the original mel) is the "
            "ceiling to compare with."
        )
    else:
        w_vae, w_tok, w_gl = tok.postprocess(x_vae), tok.postprocess(x_tok), None
    if waves_in is not None:
        L = min(waves_in.shape[-1], w_vae.shape[-1], w_tok.shape[-1])
        ref = waves_in[:, :L]
        for name, w in (("vocoder_only", w_gl), ("vae_only", w_vae), ("tokenized", w_tok)):
            if w is None:
                continue
            aud[f"wave_{name}"] = {"snr_db": M.snr(ref, w[:, :L]).item(), "stoi": _stoi(ref, w[:, :L], sr)}
        summary["stoi_tokenized"] = aud["wave_tokenized"]["stoi"]
        summary["stoi_vae_only"] = aud["wave_vae_only"]["stoi"]
        if "wave_vocoder_only" in aud:
            summary["stoi_vocoder_only"] = aud["wave_vocoder_only"]["stoi"]
        summary["snr_db_tokenized"] = aud["wave_tokenized"]["snr_db"]
    result["audio"] = aud
    for i in range(min(audio_items, w_tok.shape[0])):
        if waves_in is not None:
            figures[f"original_{i}"] = save_wav(out_dir / f"original_{i}.wav", waves_in[i], sr).name
        figures[f"vae_only_{i}"] = save_wav(out_dir / f"vae_only_{i}.wav", w_vae[i], sr).name
        figures[f"tokenized_{i}"] = save_wav(out_dir / f"tokenized_{i}.wav", w_tok[i], sr).name
    if tok.input_kind == "mel":
        rows = [
            ("original", mel_in[0] if mel_in is not None else None),
            ("VAE only", mel_vae[0]),
            ("tokenized", mel_tok[0]),
        ]
        figures["mel"] = R.save_mels(rows, out_dir / "mel.png").name


def _stoi(ref_bl: torch.Tensor, est_bl: torch.Tensor, sr: int) -> float:
    """Mean STOI over clips (pystoi); NaN when pystoi is missing or a clip is too short for it."""
    try:
        from pystoi import stoi
    except ImportError:  # pragma: no cover - pystoi is a dependency
        return math.nan
    import warnings

    vals = []
    for r, e in zip(ref_bl, est_bl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                vals.append(float(stoi(r.double().numpy(), e.double().numpy(), sr, extended=False)))
            except Exception:
                continue
    vals = [v for v in vals if v > 1e-4]  # pystoi returns 1e-5 for clips too short to score
    return float(sum(vals) / len(vals)) if vals else math.nan


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revq-ray eval",
        description="Evaluate a trained tokenizer: latent/decoded/codebook metrics, metrics.json and a "
        "report.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="export dir (save_pretrained), run dir (uses export/best) or Tokenizer bundle",
    )
    p.add_argument(
        "--input",
        required=True,
        help="latent shards (dir with manifest.json), image folder/file, IDX file or audio folder/file",
    )
    p.add_argument("--output", required=True, help="directory for metrics.json, report.md and figures")
    p.add_argument(
        "--vae",
        default=None,
        help="VAE spec (diffusers:<dir|id>, taesd:<dir>, builtin:<dir>); "
        "default: from the bundle/run/manifest",
    )
    p.add_argument(
        "--vocoder",
        default=None,
        help="mel VAEs: griffin-lim or vocos:<dir-or-hub-id> (default: the VAE's own, griffin-lim unless it "
        "was trained with vocos)",
    )
    p.add_argument("--limit", type=int, default=512, help="evaluate at most N items (0 = all; default 512)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--grid", type=int, default=8, help="columns of grid.png")
    p.add_argument(
        "--metric-weights",
        default=None,
        metavar="DIR",
        help="directory holding weights-inception-2015-12-05-6726825d.pth (rFID) and "
        "alexnet-owt-7be5be79.pth (LPIPS) under these names; else the torch hub cache, else a download",
    )
    p.add_argument(
        "--no-download",
        action="store_true",
        help="never download metric weights (also: REVQ_OFFLINE=1); missing ones are noted, not computed",
    )
    p.add_argument(
        "--no-perceptual",
        action="store_true",
        help="skip rFID, LPIPS and PESQ (Inception on CPU is slow)",
    )
    p.add_argument("--pesq-mode", choices=("wb", "nb"), default="wb", help="PESQ wide-band (default) or nb")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = evaluate(
            args.model,
            args.input,
            args.output,
            vae=args.vae,
            limit=args.limit or None,
            batch_size=args.batch_size,
            device=args.device,
            grid_items=args.grid,
            vocoder=args.vocoder,
            perceptual=not args.no_perceptual,
            metric_weights=args.metric_weights,
            download=not args.no_download,
            pesq_mode=args.pesq_mode,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"revq-ray eval: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(res["summary"]))
    print(f"report: {Path(args.output) / 'report.md'}")
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"  {k:<{width}}  {R.format_value(v)}" for k, v in summary.items())
