"""Sampling a trained prior: ids (:func:`sample`), and ``revq-ray sample``: ids -> images through the
Tokenizer, one PNG per sample and a grid picture, one row per class.

    revq-ray sample --prior runs/prior_fashion_mnist --tokenizer runs/tok --classes 0,1,2 --n 8 \\
        --output runs/samples [--temperature 1.0] [--top-k 0] [--guidance 2.0] [--seed 0]

``--output`` then holds ``<class>_<i>.png`` (class id, sample index), ``grid.png`` (a row per class, ``--n``
columns), ``ids.npy`` (the sampled ids, (len(classes) * n, T), class after class) and ``samples.json`` (the
settings, the class names and the sampling speed).

From Python (what a study calls)::

    from revq_ray.prior import load_prior, sample
    prior = load_prior("runs/prior_fashion_mnist")          # a run folder or an export folder
    ids = sample(prior, classes=[0, 1], n=8, guidance=2.0, seed=0)   # (16, T) int64, class 0's 8 first
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from revq_ray.prior.data import TokenDataError, check_same_tokenizer, tokenizer_model_sha256
from revq_ray.prior.model import CONFIG_NAME, PriorTransformer


def resolve_prior_dir(path: str | Path) -> Path:
    """A folder holding a saved prior: the folder itself, else its ``export/best``, else ``export/latest``
    (a run folder of ``python -m revq_ray.prior``)."""
    p = Path(path).expanduser()
    for c in (p, p / "export" / "best", p / "export" / "latest"):
        if (c / CONFIG_NAME).is_file() and (c / "model.safetensors").is_file():
            return c
    raise FileNotFoundError(
        f"{str(p)!r} holds no prior: expected a run folder of `python -m revq_ray.prior` (export/best or "
        "export/latest) or an export folder (config.json + model.safetensors)"
    )


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> PriorTransformer:
    """Load a prior from a run folder or an export folder (:func:`resolve_prior_dir`)."""
    d = resolve_prior_dir(path)
    prior = PriorTransformer.from_pretrained(d, device=device)
    prior.source_dir = str(d)  # named in error messages
    return prior


def _where(prior: PriorTransformer) -> str:
    return f"{getattr(prior, 'source_dir', '<prior>')}/{CONFIG_NAME}"


def check_classes(prior: PriorTransformer, classes: Sequence[int] | None) -> list[int]:
    """The class ids to sample, checked: within [0, num_classes) for a conditional prior; none (the null
    class) for an unconditional one. Raises ValueError naming the prior's file and field."""
    nc = prior.spec.num_classes
    if nc == 0:
        if classes:
            raise ValueError(
                f"--classes {','.join(map(str, classes))}: the prior is unconditional ({_where(prior)}: "
                "spec.num_classes = 0, trained on a dataset without class labels); leave --classes out"
            )
        return [prior.spec.null_class]
    if not classes:
        return list(range(nc))
    names = prior.meta.get("class_names") or []
    bad = [c for c in classes if not 0 <= int(c) < nc]
    if bad:
        listing = ", ".join(f"{i}={n}" for i, n in enumerate(names)) or f"0..{nc - 1}"
        raise ValueError(
            f"--classes: class id(s) {bad} out of range: the prior ({_where(prior)}: "
            f"spec.num_classes = {nc}) "
            f"knows {listing}"
        )
    return [int(c) for c in classes]


@torch.no_grad()
def sample(
    prior: PriorTransformer | str | Path,
    classes: Sequence[int] | None = None,
    n: int = 1,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    kv_cache: bool = True,
) -> torch.Tensor:
    """``n`` samples of each class in ``classes`` (all classes when None; an unconditional prior: leave it
    None) -> ids (len(classes) * n, T) int64 per-position ids in [0, K), class after class. Reproducible:
    the same ``seed``, settings and ``batch_size`` give the same ids (batch i draws from a generator seeded
    from ``seed`` and i). ``kv_cache=False`` uses the full-prefix reference sampler (slow; for checks)."""
    model = prior if isinstance(prior, PriorTransformer) else load_prior(prior)
    cls = check_classes(model, classes)
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one sample per class")
    device = model.class_emb.weight.device
    labels = torch.tensor([c for c in cls for _ in range(n)], dtype=torch.long, device=device)
    out = []
    gen_fn = model.generate if kv_cache else model.generate_full_prefix
    for i, start in enumerate(range(0, len(labels), batch_size)):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        out.append(
            gen_fn(
                labels[start : start + batch_size],
                temperature=temperature,
                top_k=top_k,
                guidance=guidance,
                generator=gen,
            ).cpu()
        )
    return torch.cat(out)


@torch.no_grad()
def evaluate_nll(
    prior: PriorTransformer | str | Path, tokens: str | Path, *, batch_size: int = 64, limit: int = 0
) -> dict[str, float]:
    """The prior's cross-entropy on a token dataset (every item, conditioned on its label when the prior is
    conditional): ``{"nll_per_token" (nats), "bits_per_image", "acc" (top-1 per token), "images"}``. The
    dataset must come from the prior's tokenizer (T, K, weights) and carry labels when the prior is
    conditional; otherwise a :class:`~revq_ray.prior.data.TokenDataError` names the file and the field."""
    import math

    from revq_ray.prior.data import load_token_dataset

    model = prior if isinstance(prior, PriorTransformer) else load_prior(prior)
    conditional = model.spec.num_classes > 0
    data = load_token_dataset(
        str(tokens), conditional="yes" if conditional else "no", augmented=False, limit=limit
    )
    where = f"{tokens}/manifest.json"
    check_same_tokenizer(model.meta.get("tokenizer") or {}, _where(model), data.tokenizer, where)
    if conditional and data.class_names != (model.meta.get("class_names") or data.class_names):
        raise TokenDataError(
            f"{where}: field 'labels.names' {data.class_names} differs from the prior's classes "
            f"({_where(model)}: meta.class_names {model.meta.get('class_names')})"
        )
    device = model.class_emb.weight.device
    nll = hits = n = 0.0
    for i in range(0, len(data.ids), batch_size):
        ids = torch.from_numpy(data.ids[i : i + batch_size]).to(device)
        labels = torch.from_numpy(data.labels[i : i + batch_size]).to(device)
        if not conditional:
            labels = torch.full_like(labels, model.spec.null_class)
        logits = model(ids, labels)
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="sum"
            )
        )
        hits += float((logits.argmax(-1) == ids).sum())
        n += ids.numel()
    per_token = nll / n
    return {
        "nll_per_token": per_token,
        "bits_per_image": per_token * model.spec.tokens / math.log(2),
        "acc": hits / n,
        "images": len(data.ids),
    }


def check_tokenizer(prior: PriorTransformer, tok: Any, tokenizer_path: str) -> None:
    """Stop (ValueError naming the files and fields) unless ``tok`` is the tokenizer the prior was trained on:
    T and K, and its weights (:func:`~revq_ray.prior.data.tokenizer_model_sha256`) when the prior recorded
    them."""
    recorded = prior.meta.get("tokenizer") or {}
    if not recorded:
        raise TokenDataError(
            f"{_where(prior)}: field 'meta.tokenizer' is missing: not a prior of this revq-ray"
        )
    given = {
        "tokens": tok.tokens,
        "codebook_size": tok.codebook_size,
        "model": tokenizer_path,
        "model_sha256": tokenizer_model_sha256(tokenizer_path),
    }
    check_same_tokenizer(recorded, _where(prior), given, f"--tokenizer {tokenizer_path}")


def save_grid(images_bchw: torch.Tensor, rows: int, cols: int, path: Path, pad: int = 2) -> None:
    """Images (rows * cols, 3, H, W) in [0, 1] -> one PNG, row r = images r*cols .. r*cols + cols - 1."""
    import numpy as np
    from PIL import Image

    b, c, h, w = images_bchw.shape
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8) * 255
    arr = (images_bchw.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    if c == 1:
        arr = arr.repeat(3, -1)
    for i in range(min(b, rows * cols)):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = arr[i][..., :3]
    Image.fromarray(grid).save(path)


def run_sample(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """``revq-ray sample`` (module docstring); returns what samples.json holds."""
    import numpy as np
    from PIL import Image

    from revq_ray.tokenizer import Tokenizer

    prior = load_prior(args.prior, device=args.device)
    classes = (
        None if args.classes in (None, "") else [int(c) for c in str(args.classes).split(",") if c.strip()]
    )
    cls = check_classes(prior, classes)
    tok = Tokenizer.from_pretrained(args.tokenizer, device=args.device, vae=args.vae)
    if tok.modality != "image":
        raise ValueError(f"--tokenizer {args.tokenizer}: a {tok.modality} tokenizer; the prior makes images")
    check_tokenizer(prior, tok, args.tokenizer)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ids = sample(
        prior,
        None if prior.spec.num_classes == 0 else cls,
        args.n,
        temperature=args.temperature,
        top_k=args.top_k,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    dt = time.perf_counter() - t0
    rate = len(ids) / dt
    images = tok.decode(ids)
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    names = prior.meta.get("class_names") or []
    files = []
    for i in range(len(ids)):
        c, j = cls[i // args.n], i % args.n
        arr = (images[i].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        f = out / f"{'uncond' if prior.spec.num_classes == 0 else f'{c:03d}'}_{j:04d}.png"
        Image.fromarray(arr).save(f)
        files.append(f.name)
    save_grid(images, len(cls), args.n, out / "grid.png")
    np.save(out / "ids.npy", ids.numpy().astype(np.int32), allow_pickle=False)
    info = {
        "prior": str(resolve_prior_dir(args.prior)),
        "tokenizer": str(args.tokenizer),
        "classes": cls if prior.spec.num_classes else [],
        "class_names": [names[c] for c in cls] if names else [],
        "n": args.n,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "guidance": args.guidance,
        "seed": args.seed,
        "samples": len(ids),
        "sampling_seconds": round(dt, 3),
        "samples_per_s": round(rate, 3),
        "device": str(args.device),
        "torch_threads": torch.get_num_threads(),
        "files": files,
        "grid": "grid.png",
    }
    (out / "samples.json").write_text(json.dumps(info, indent=1))
    log(
        f"[sample] {len(ids)} samples ({len(cls)} class(es) x {args.n}) in {dt:.2f}s: {rate:.2f} samples/s "
        f"on {args.device} ({torch.get_num_threads()} threads, KV cache); PNGs + grid.png in {out}"
    )
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revq-ray sample",
        description="Sample a trained prior: ids -> images through the Tokenizer (PNGs + a grid, a row per "
        "class).",
    )
    p.add_argument("--prior", required=True, help="a `python -m revq_ray.prior` run folder or export folder")
    p.add_argument("--tokenizer", required=True, help="the Tokenizer bundle the prior's tokens came from")
    p.add_argument("--vae", default=None, help="VAE spec when --tokenizer is not a bundle")
    p.add_argument("--classes", default=None, help="comma list of class ids (default: every class)")
    p.add_argument("--n", type=int, default=8, help="samples per class (default 8)")
    p.add_argument("--output", required=True, help="folder for the PNGs, grid.png, ids.npy, samples.json")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = argmax)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0 = all)")
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale s: uncond + s*(cond - uncond); 1 = off",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples drawn at once")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_sample(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"revq-ray sample: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
