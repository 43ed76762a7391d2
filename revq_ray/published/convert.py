"""Read and write the ReVQ authors' published checkpoint format (``ckpt.pth`` + ``512T_NC=16384.yaml``).

Import: the yaml gives the shapes, ``ckpt.pth`` (read with ``torch.load(weights_only=True)``) the
tensors: ``"quantizer"`` ``{embeddings (G, K, d), count (G, K), index_offset (G,)}`` and ``"decoder"`` (the
state dict of their ``DCAEDecoder``, which :class:`revq_ray.core.rectifiers_published.DCAERectifier` loads
key for key).
The latent statistics file (``mean``, ``std``: the 2,048 values of a (32, 8, 8) latent, flattened C-major)
becomes the standardizer. The result is a Tokenizer bundle (``tokenizer.json`` + ``model/`` holding
``config.json`` and ``model.safetensors``) whose VAE spec is the authors' DC-AE.

Export is the reverse, for a model with ``quantizer.type`` revq/vq and ``rectifier.type`` dcae: ``ckpt.pth``
with ``"decoder"`` and ``"quantizer"``, the yaml, and the statistics file.

Every mismatch is an error that names the key (or yaml field) and both shapes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DCAE_VAE_SPEC = "diffusers:mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
DCAE_FACTOR = 32  # DC-AE f32: an 8x8 latent is a 256x256 image
CKPT_NAME = "ckpt.pth"
YAML_NAME = "512T_NC=16384.yaml"  # the authors use this file name for every published model
STATS_NAME = "latent_stats.safetensors"
HUB_MODELS = {
    "512T": "AndyRaoTHU/revq-512T",
    "256T-B": "AndyRaoTHU/revq-256T-B",
    "256T-L": "AndyRaoTHU/revq-256T-L",
}


class PublishedFormatError(ValueError):
    """A published checkpoint, yaml or statistics file does not have the expected keys or shapes."""


# --------------------------------------------------------------------------------------------- the yaml
@dataclass(frozen=True)
class PublishedSpec:
    """The shapes a published yaml fixes: latent (C, H, W), G groups of K codes, decoder W x depth."""

    latent_shape: tuple[int, int, int]
    num_code: int
    num_group: int
    width: int
    depth: int
    head_dim: int = 32
    qkv_multiscales: tuple[int, ...] = (5,)

    @property
    def token_dim(self) -> int:
        return math.prod(self.latent_shape) // self.num_group

    def model_config(self) -> dict[str, Any]:
        """The revq-ray ``ModelConfig`` (as a dict) of the same model."""
        return {
            "quantizer": {"type": "revq", "tokens": self.num_group, "codebook_size": self.num_code},
            "rectifier": {
                "type": "dcae",
                "width": self.width,
                "depth": self.depth,
                "head_dim": self.head_dim,
            },
        }

    def to_yaml_dict(self) -> dict[str, Any]:
        """The ``model`` section the authors' code reads."""
        c = self.latent_shape[0]
        return {
            "model": {
                "input_data_size": list(self.latent_shape),
                "quantizer": {
                    "TYPE": "vq",
                    "num_code": self.num_code,
                    "num_group": self.num_group,
                    "tokens_per_data": self.num_group,
                },
                "decoder": {
                    "TYPE": "dc_ae",
                    "in_channels": c,
                    "latent_channels": c,
                    "attention_head_dim": self.head_dim,
                    "block_type": ["EfficientViTBlock"],
                    "block_out_channels": [self.width],
                    "layers_per_block": [self.depth],
                    "qkv_multiscales": [list(self.qkv_multiscales)],
                    "norm_type": "rms_norm",
                    "act_fn": "silu",
                    "upsample_block_type": "interpolate",
                },  # fmt: skip
            }
        }


def _one(value: Any, field: str, src: str) -> Any:
    """A per-stage list of one entry (the rectifier has one stage) -> the entry."""
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise PublishedFormatError(f"{src}: {field}={value!r}: only one-stage decoders are supported")
        return value[0]
    return value


def _need(section: Mapping[str, Any], key: str, where: str, src: str) -> Any:
    if key not in section:
        raise PublishedFormatError(f"{src}: {where}.{key} is missing")
    return section[key]


def spec_from_yaml_dict(data: Any, src: str = "yaml") -> PublishedSpec:
    """Validate the authors' yaml (as loaded) and return its shapes; errors name the yaml field."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise PublishedFormatError(f"{src}: no 'model' section (not a ReVQ yaml)")
    size = _need(model, "input_data_size", "model", src)
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise PublishedFormatError(f"{src}: model.input_data_size={size!r}: expected [C, H, W]")
    q, d = _need(model, "quantizer", "model", src), _need(model, "decoder", "model", src)
    if str(q.get("TYPE", "vq")).lower() != "vq":
        raise PublishedFormatError(f"{src}: model.quantizer.TYPE={q.get('TYPE')!r}: only 'vq' is supported")
    k, g = (
        int(_need(q, "num_code", "model.quantizer", src)),
        int(_need(q, "num_group", "model.quantizer", src)),
    )
    if int(q.get("tokens_per_data", g)) != g:
        raise PublishedFormatError(
            f"{src}: model.quantizer.tokens_per_data={q['tokens_per_data']} != num_group={g}: the published "
            "models use one group per token"
        )
    if math.prod(size) % g:
        raise PublishedFormatError(f"{src}: model.quantizer.num_group={g} does not divide {size} latents")
    if str(d.get("TYPE", "dc_ae")) != "dc_ae":
        raise PublishedFormatError(f"{src}: model.decoder.TYPE={d.get('TYPE')!r}: only 'dc_ae' is supported")
    for key in ("in_channels", "latent_channels"):
        if int(d.get(key, size[0])) != size[0]:
            raise PublishedFormatError(f"{src}: model.decoder.{key}={d[key]} != latent channels {size[0]}")
    checks = {"block_type": "EfficientViTBlock", "norm_type": "rms_norm", "in_shortcut": True}
    for key, want in checks.items():
        if key in d and _one(d[key], f"model.decoder.{key}", src) != want:
            raise PublishedFormatError(f"{src}: model.decoder.{key}={d[key]!r}: only {want!r} is supported")
    return PublishedSpec(
        latent_shape=(size[0], size[1], size[2]),
        num_code=k,
        num_group=g,
        width=int(_one(_need(d, "block_out_channels", "model.decoder", src), "block_out_channels", src)),
        depth=int(_one(_need(d, "layers_per_block", "model.decoder", src), "layers_per_block", src)),
        head_dim=int(d.get("attention_head_dim", 32)),
        qkv_multiscales=tuple(int(x) for x in _one(d.get("qkv_multiscales", [[5]]), "qkv_multiscales", src)),
    )


def read_published_yaml(path: str | os.PathLike) -> PublishedSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file (the authors' 512T_NC=16384.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PublishedFormatError(f"{path}: not valid YAML ({err})") from None
    return spec_from_yaml_dict(data, str(path))


# --------------------------------------------------------------------------------------------- ckpt.pth
def load_published_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file (the authors' ckpt.pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of a bad file come in many types
        text = str(err)
        # torch's weights_only refusal is long; its one useful line names the object it refused.
        why = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), text[:300])
        raise PublishedFormatError(
            f"{path}: cannot be read as a tensors-only torch checkpoint (truncated, corrupt, or holding "
            f"objects other than tensors; never unpickled): {type(err).__name__}: {why}"
        ) from None
    if not isinstance(ckpt, dict):
        raise PublishedFormatError(f"{path}: holds a {type(ckpt).__name__}, expected a dict")
    for key in ("quantizer", "decoder"):
        if not isinstance(ckpt.get(key), dict):
            raise PublishedFormatError(
                f"{path}: key {key!r} is missing or not a state dict (found keys {sorted(map(str, ckpt))})"
            )
    return ckpt


def check_state(
    got: Mapping[str, Any], want: Mapping[str, torch.Size | tuple[int, ...]], where: str, hint: str = ""
) -> None:
    """Same keys, tensors of the same shapes; the error names the first offending key(s) and both shapes."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[:3]}")
        raise PublishedFormatError(f"{where}: {'; '.join(parts)}{hint}")
    for k, shape in want.items():
        t = got[k]
        if not isinstance(t, torch.Tensor):
            raise PublishedFormatError(f"{where}: {k} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise PublishedFormatError(
                f"{where}: {k} has shape {tuple(t.shape)}, expected {tuple(shape)}{hint}"
            )


def read_stats(path: str | os.PathLike, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``mean`` and ``std`` of a statistics safetensors file, reshaped to ``latent_shape``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--stats {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PublishedFormatError(f"{path}: not a readable safetensors file ({err})") from None
    n = math.prod(latent_shape)
    out = []
    for key in ("mean", "std"):
        t = tensors.get(key)
        if t is None:
            raise PublishedFormatError(f"{path}: key {key!r} is missing (found {sorted(tensors)})")
        if t.numel() != n:
            raise PublishedFormatError(
                f"{path}: {key} has shape {tuple(t.shape)} ({t.numel()} values), expected {n} values "
                f"for latents of shape {tuple(latent_shape)}"
            )
        out.append(t.float().reshape(latent_shape))
    if not bool((out[1] > 0).all()) or not bool(torch.isfinite(out[0]).all()):
        raise PublishedFormatError(f"{path}: std must be positive and mean finite everywhere")
    return out[0], out[1]


# --------------------------------------------------------------------------------------------- import
_DECODER_HINT = " (the yaml's model.decoder block_out_channels / layers_per_block / attention_head_dim)"


def _quantizer_state(q: Mapping[str, Any], spec: PublishedSpec, src: str) -> dict[str, torch.Tensor]:
    """The authors' quantizer state -> ``quantizer.codebook`` and ``quantizer.counts``."""
    g, k, d = spec.num_group, spec.num_code, spec.token_dim
    want = {"embeddings": (g, k, d), "count": (g, k), "index_offset": (g,)}
    present = {key: want[key] for key in q if key in want}
    if "embeddings" not in q:
        raise PublishedFormatError(f"{src}: 'quantizer' has no 'embeddings' (found {sorted(q)})")
    hint = " (the yaml's model.quantizer num_group / num_code and model.input_data_size)"
    check_state(q, present, f"{src}: 'quantizer'", hint)
    emb = q["embeddings"].float()
    if not bool(torch.isfinite(emb).all()):
        raise PublishedFormatError(f"{src}: quantizer.embeddings holds non-finite values")
    if "index_offset" in q and not torch.equal(q["index_offset"].long(), torch.arange(g) * k):
        raise PublishedFormatError(
            f"{src}: quantizer.index_offset is not g * num_code ({k}) for g = 0..{g - 1}"
        )
    # Hits since the last reset: float in the authors' code, int64 here.
    counts = q["count"].float().round().long() if "count" in q else torch.zeros(g, k, dtype=torch.long)
    return {"quantizer.codebook": emb.contiguous(), "quantizer.counts": counts}


def model_from_published(
    ckpt: Mapping[str, Any], spec: PublishedSpec, mean: torch.Tensor, std: torch.Tensor, src: str = "ckpt"
) -> Any:
    """A :class:`~revq_ray.core.model.ReVQModel` (eval mode) holding a published checkpoint's weights."""
    from revq_ray.core.model import ReVQModel

    model = ReVQModel(list(spec.latent_shape), spec.model_config())
    want_dec = {k: v.shape for k, v in model.rectifier.state_dict().items()}
    check_state(ckpt["decoder"], want_dec, f"{src}: 'decoder'", _DECODER_HINT)
    state = {
        "standardizer.mean": mean,
        "standardizer.std": std,
        **_quantizer_state(ckpt["quantizer"], spec, src),
        **{f"rectifier.{k}": v.float().contiguous() for k, v in ckpt["decoder"].items()},
    }
    model.load_state_dict(state, strict=True)
    return model.eval()


def _find_one(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise PublishedFormatError(
                f"{directory}: several files match {pattern!r}: {[f.name for f in found]}"
            )
    return None


def _hub_download(repo: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, auth: all end here
        raise FileNotFoundError(
            f"could not fetch {filename} from the hub repo {repo!r} "
            f"({type(err).__name__}: {str(err)[:200]}); "
            "download ckpt.pth and the yaml by hand and pass --checkpoint and --config"
        ) from None


def resolve_source(
    source: str | None,
    checkpoint: str | None,
    config: str | None,
    stats: str | None,
    revision: str | None = None,
) -> tuple[Path, Path, Path | None]:
    """(ckpt.pth, yaml, stats or None) from explicit files, a local snapshot directory or a hub repo id."""
    if source is None:
        if not (checkpoint and config):
            raise ValueError("give --checkpoint and --config, or a local snapshot directory / hub repo id")
        return Path(checkpoint), Path(config), Path(stats) if stats else None
    src = Path(source).expanduser()
    if src.is_dir():
        ckpt = Path(checkpoint) if checkpoint else _find_one(src, (CKPT_NAME, "*.pth"))
        yml = Path(config) if config else _find_one(src, (YAML_NAME, "*.yaml", "*.yml"))
        if ckpt is None or yml is None:
            raise FileNotFoundError(
                f"{src}: expected {CKPT_NAME} and {YAML_NAME} (the files of a published repo)"
            )
        found_stats = _find_one(src, ("*stats*.safetensors",))
        return ckpt, yml, Path(stats) if stats else found_stats
    repo = HUB_MODELS.get(source, source)
    if repo.count("/") != 1:
        raise FileNotFoundError(f"{source!r} is neither a directory nor a hub repo id (owner/name)")
    ckpt = Path(checkpoint) if checkpoint else _hub_download(repo, CKPT_NAME, revision)
    yml = Path(config) if config else _hub_download(repo, YAML_NAME, revision)
    return ckpt, yml, Path(stats) if stats else None


def write_bundle(model: Any, output: str | os.PathLike, vae_spec: str, source: dict[str, Any]) -> Path | str:
    """A Tokenizer bundle (``tokenizer.json`` + ``model/``) for ``model``, without loading the VAE. A URI
    ``output`` (``s3://...``) is written into a local staging folder, then uploaded (``tokenizer.json``
    last, so a reader never finds a bundle without its model); the URI is returned."""
    import shutil
    import tempfile

    from revq_ray.data import fs as _fs
    from revq_ray.runtime import is_uri
    from revq_ray.tokenizer import CONFIG_NAME, FORMAT, MODEL_SUBDIR, VERSION

    if is_uri(output):
        staging = Path(tempfile.mkdtemp(prefix="revq_bundle_"))
        try:
            write_bundle(model, staging, vae_spec, source)
            _fs.upload_tree(staging, str(output), skip=(CONFIG_NAME,))
            _fs.upload_tree(staging, str(output), skip=(MODEL_SUBDIR,))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(output)
    out = Path(output).expanduser()
    model.save_pretrained(str(out / MODEL_SUBDIR))
    size = int(model.latent_shape[-1]) * DCAE_FACTOR
    cfg = {
        "format": FORMAT, "version": VERSION, "vae": vae_spec, "modality": "image", "input_kind": "image",
        "input_shape": [3, size, size], "latent_shape": list(model.latent_shape), "image_size": size,
        "image_resize": "center_crop", "sample_rate": None, "tokens": int(model.tokens),
        "codebook_size": int(model.codebook_size), "bits_per_sample": float(model.bits_per_sample),
        "quantizer": model.cfg.quantizer.type, "rectifier": model.cfg.rectifier.type, "imported_from": source,
    }  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return out


def import_revq(
    output: str | os.PathLike,
    source: str | None = None,
    *,
    checkpoint: str | None = None,
    config: str | None = None,
    stats: str | None = None,
    vae_spec: str = DCAE_VAE_SPEC,
    revision: str | None = None,
) -> Path | str:
    """Convert a published ReVQ model into a Tokenizer bundle at ``output`` (a folder or a URI); returns
    ``output``.

    ``source``: a local snapshot directory (holding ``ckpt.pth`` and the yaml) or a hub repo id (or one of
    ``512T``, ``256T-B``, ``256T-L``); or pass ``checkpoint`` and ``config`` files. ``stats``: the latent
    statistics (``mean``/``std`` safetensors); found in a snapshot directory when it holds one.
    """
    from revq_ray.data.fs import check_location

    check_location(output, write=True)  # a URI that cannot take the bundle fails now, not after converting
    ckpt_path, yaml_path, stats_path = resolve_source(source, checkpoint, config, stats, revision)
    spec = read_published_yaml(yaml_path)
    if stats_path is None:
        raise FileNotFoundError(
            "no latent statistics: pass --stats FILE (for the authors' DC-AE sana-1.1 ImageNet latents: "
            "../shared/models/revq-published/dcae_f32c32_sana11_imagenet_stats.safetensors)"
        )
    mean, std = read_stats(stats_path, spec.latent_shape)
    model = model_from_published(load_published_checkpoint(ckpt_path), spec, mean, std, str(ckpt_path))
    info = {"checkpoint": str(ckpt_path), "config": str(yaml_path), "stats": str(stats_path)}
    if source:
        info["source"] = source
    return write_bundle(model, output, vae_spec, info)


# --------------------------------------------------------------------------------------------- export
def spec_from_model(model: Any) -> PublishedSpec:
    """The published shapes of a revq-ray model; errors say what cannot be expressed in that format."""
    q, r = model.cfg.quantizer, model.cfg.rectifier
    if q.type not in ("revq", "vq"):
        raise PublishedFormatError(f"model.quantizer.type={q.type}: the published format holds revq/vq only")
    if r.type != "dcae":
        raise PublishedFormatError(
            f"model.rectifier.type={r.type}: the authors' code loads only their decoder; train (or "
            "fine-tune) with model.rectifier.type=dcae to export"
        )
    if len(model.latent_shape) != 3:
        raise PublishedFormatError(f"latent shape {model.latent_shape}: the published format is (C, H, W)")
    c, h, w = (int(s) for s in model.latent_shape)
    return PublishedSpec(
        (c, h, w), int(q.codebook_size), int(q.tokens), int(r.width), int(r.depth), int(r.head_dim)
    )


def export_revq(model_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write ``ckpt.pth``, the yaml and ``latent_stats.safetensors`` for the authors' code (-> ``output``)."""
    import yaml
    from safetensors.torch import save_file

    from revq_ray.core.files import follow_umask
    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import resolve_model_dir

    model = ReVQModel.from_pretrained(str(resolve_model_dir(model_dir)))
    spec = spec_from_model(model)
    g, k = spec.num_group, spec.num_code
    quantizer = {
        "embeddings": model.quantizer.codebook.detach().float().clone().contiguous(),
        "count": model.quantizer.counts.detach().float().clone(),
        "index_offset": torch.arange(g, dtype=torch.long) * k,
    }
    decoder = {k_: v.detach().float().clone().contiguous() for k_, v in model.rectifier.state_dict().items()}
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"decoder": decoder, "quantizer": quantizer}, out / CKPT_NAME)
    (out / YAML_NAME).write_text(yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False))
    st = model.standardizer
    stats = {"mean": st.mean.detach().flatten().contiguous(), "std": st.std.detach().flatten().contiguous()}
    save_file(stats, str(out / STATS_NAME))
    follow_umask(out / STATS_NAME)  # safetensors writes 0600
    return out
