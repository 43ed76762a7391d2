"""A token dataset for the prior: read, checked against what the prior needs, split, and its tokenizer's
identity.

The dataset is a ``revq-ray tokenize`` output directory (format ``revq-ray-tokens``, read with
:func:`revq_ray.tokenize.read_tokens`): ``manifest.json`` (``tokenizer`` with T = ``tokens`` and K =
``codebook_size``, ``vocab``, ``labels``) and ids per image. Token datasets are small (60,000 Fashion-MNIST
images x 256 ids x 2 bytes = 31 MB), so :func:`load_token_dataset` reads one whole into two arrays: ids (N, T)
int64 in [0, K), labels (N,). Bad input stops with a :class:`TokenDataError` naming the file and the field:

- not an image dataset (audio ids are (W, T) windows), or an item whose ids are not (T,);
- ``"vocab": "flat"`` (id = t*K + k): **converted** to per-position ids (k = id - t*K) after checking that
  every id lies in its position's range [t*K, (t+1)*K); an id outside it is an error naming the item;
- an id outside [0, K) in a per-position dataset;
- a conditional prior (``model.conditional: yes``) on a dataset without class labels (``labels`` missing,
  or an item without ``label``), or a label outside [0, len(names)).

The hold-out: ``data.val_items`` source images chosen by a stable hash of their keys (sha1, not Python's
salted ``hash``); a flipped copy (``"augment": "flip"``) goes with its ``source_key``, so no validation
image is seen flipped in training. Validation uses the original images only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
CODEBOOKS_FILE = "codebooks.safetensors"
CODEBOOKS_KEY = "codebooks_tkd"


class TokenDataError(ValueError):
    """A token dataset the prior cannot use as it is; the message names the file and the field."""


@dataclass
class TokenData:
    """A token dataset in memory. ``ids`` (N, T) int64 per-position ids in [0, K); ``labels`` (N,) int64
    (the null class ``num_classes`` for every row when unconditional); ``val`` (N,) bool: held out."""

    path: str
    ids: np.ndarray
    labels: np.ndarray
    val: np.ndarray
    tokens: int
    codebook_size: int
    class_names: list[str]
    conditional: bool
    tokenizer: dict[str, Any]
    manifest_sha256: str
    vocab: str
    codebooks_tkd: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.conditional else 0


def class_labels_info(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's class-label description (``{"kind": "class", "names": [...]}``), or None. ``labels``
    may be one description or a list of them (class labels and captions)."""
    got = manifest.get("labels")
    for d in got if isinstance(got, list) else [got]:
        if isinstance(d, dict) and d.get("kind") == "class":
            return d
    return None


def stable_hash(key: str) -> int:
    """A hash of ``key`` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def holdout(keys: list[str], sources: list[str], augmented: np.ndarray, val_items: int) -> np.ndarray:
    """(N,) bool: the items whose source is among the ``val_items`` source keys of lowest stable hash."""
    originals = sorted({s for s, a in zip(sources, augmented) if not a} or set(sources), key=stable_hash)
    chosen = set(originals[:val_items])
    return np.array([s in chosen for s in sources], dtype=bool)


def tokenizer_model_sha256(model: str | None) -> str | None:
    """A fingerprint of the tokenizer's weights (its ``model.safetensors``: standardizer, codebooks,
    rectifier): sha256 over every tensor's name, dtype, shape and bytes, in name order, so a copy re-saved
    elsewhere (an export turned into a bundle) has the same one. None when the model cannot be read here."""
    if not model:
        return None
    try:
        import safetensors.numpy

        from revq_ray.tokenizer import resolve_model_dir

        tensors = safetensors.numpy.load_file(str(resolve_model_dir(model) / "model.safetensors"))
    except (FileNotFoundError, OSError, ValueError):
        return None
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _codebooks(root: Path, manifest: dict[str, Any], T: int, K: int) -> np.ndarray | None:
    name = manifest.get("codebooks") or (CODEBOOKS_FILE if (root / CODEBOOKS_FILE).is_file() else None)
    if not name:
        return None
    f = root / name
    if not f.is_file():
        raise TokenDataError(f"{root / MANIFEST}: field 'codebooks' names {name!r}, which does not exist")
    import safetensors.numpy

    got = safetensors.numpy.load_file(str(f))
    if CODEBOOKS_KEY not in got:
        raise TokenDataError(f"{f}: no tensor {CODEBOOKS_KEY!r} (found {sorted(got)})")
    c = got[CODEBOOKS_KEY]
    if c.ndim != 3 or c.shape[:2] != (T, K):
        raise TokenDataError(
            f"{f}: {CODEBOOKS_KEY} has shape {c.shape}, expected (T, K, d) with T={T}, K={K} "
            f"(the manifest's tokenizer.tokens / codebook_size)"
        )
    return c.astype(np.float32)


def load_token_dataset(
    path: str,
    *,
    conditional: str = "auto",
    val_items: int = 0,
    augmented: bool = True,
    limit: int = 0,
) -> TokenData:
    """Read and check a token dataset (see the module docstring). ``conditional``: "yes" | "no" | "auto"."""
    from revq_ray.data.fs import local_copy
    from revq_ray.tokenize import read_tokens

    root = local_copy(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise TokenDataError(
            f"data.tokens={path}: no {MANIFEST} there; write a token dataset with `revq-ray tokenize "
            "--model TOKENIZER --input IMAGES --output DIR`"
        )
    raw = mf.read_bytes()
    manifest, items = read_tokens(root)
    tok = manifest.get("tokenizer") or {}
    for key in ("tokens", "codebook_size"):
        if not isinstance(tok.get(key), int):
            raise TokenDataError(f"{mf}: field 'tokenizer.{key}' is missing or not an integer")
    T, K = int(tok["tokens"]), int(tok["codebook_size"])
    if tok.get("modality", "image") != "image":
        raise TokenDataError(
            f"{mf}: field 'tokenizer.modality' is {tok.get('modality')!r}: the prior models images (T ids "
            "each); audio ids are windows of T ids in time, which it does not model"
        )
    vocab = manifest.get("vocab", "per_position")
    if vocab not in ("per_position", "flat"):
        raise TokenDataError(f"{mf}: field 'vocab' is {vocab!r}; expected 'per_position' or 'flat'")
    info = class_labels_info(manifest)
    if conditional == "yes" and info is None:
        raise TokenDataError(
            f"{mf}: field 'labels' (kind 'class') is missing, but the prior is conditional "
            "(model.conditional=yes): tokenize with class labels (`revq-ray tokenize --labels ...`) or set "
            "model.conditional=no"
        )
    cond = conditional == "yes" or (conditional == "auto" and info is not None)
    names = [str(n) for n in info.get("names", [])] if cond and info else []
    if cond and not names:
        raise TokenDataError(f"{mf}: field 'labels.names' is empty: the class labels need their names")
    offsets = np.arange(T, dtype=np.int64) * K
    ids_rows, labels, keys, sources, aug = [], [], [], [], []
    for meta, arr in items:
        key = str(meta.get("key"))
        where = f"{mf} item {key!r}" + (f" ({meta['file']})" if "file" in meta else "")
        a = np.asarray(arr).astype(np.int64)
        if a.shape != (T,):
            raise TokenDataError(f"{where}: ids of shape {a.shape}, expected (T,) = ({T},) per image")
        if vocab == "flat":
            k = a - offsets
            if (k < 0).any() or (k >= K).any():
                t = int(np.flatnonzero((k < 0) | (k >= K))[0])
                raise TokenDataError(
                    f"{where}: flat id {int(a[t])} at position {t} is outside that position's range "
                    f"[{t * K}, {(t + 1) * K}) (manifest 'vocab': 'flat', id = t*K + k)"
                )
            a = k
        elif a.min() < 0 or a.max() >= K:
            raise TokenDataError(
                f"{where}: ids in [{int(a.min())}, {int(a.max())}], outside [0, K={K}) "
                "(manifest 'vocab': 'per_position')"
            )
        is_aug = bool(meta.get("augment"))
        if is_aug and not augmented:
            continue
        if cond:
            lab = meta.get("label")
            if not isinstance(lab, int) or isinstance(lab, bool):
                raise TokenDataError(
                    f"{where}: field 'label' is missing or not an integer, but the prior is conditional"
                )
            if not 0 <= lab < len(names):
                raise TokenDataError(
                    f"{where}: field 'label' = {lab} is outside [0, {len(names)}) (manifest labels.names)"
                )
            labels.append(lab)
        ids_rows.append(a)
        keys.append(key)
        sources.append(str(meta.get("source_key", key)) if is_aug else key)
        aug.append(is_aug)
        if limit and len(ids_rows) >= limit:
            break
    if not ids_rows:
        raise TokenDataError(f"{mf}: field 'items' lists no usable item")
    ids = np.stack(ids_rows)
    if cond:
        lab_arr = np.asarray(labels, dtype=np.int64)
    else:
        lab_arr = np.zeros(len(ids), dtype=np.int64)  # replaced by the null class at training time
    aug_arr = np.asarray(aug, dtype=bool)
    val = holdout(keys, sources, aug_arr, val_items)
    # validation: originals only (a flipped copy of a held-out image is neither trained nor validated on)
    train_mask = ~val
    val = val & ~aug_arr
    keep = train_mask | val
    data = TokenData(
        path=str(path),
        ids=ids[keep],
        labels=lab_arr[keep],
        val=val[keep],
        tokens=T,
        codebook_size=K,
        class_names=names,
        conditional=cond,
        tokenizer=dict(tok),
        vocab=vocab,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        codebooks_tkd=_codebooks(root, manifest, T, K),
    )
    if vocab == "flat":
        data.notes.append(f"{mf}: 'vocab': 'flat' ids converted to per-position ids (k = id - t*K)")
    return data


def prior_tokenizer_identity(data: TokenData) -> dict[str, Any]:
    """What a prior records about the tokenizer whose ids it models (``meta.tokenizer`` of its export)."""
    tok = data.tokenizer
    return {
        "tokens": data.tokens,
        "codebook_size": data.codebook_size,
        "model": tok.get("model"),
        "vae": tok.get("vae"),
        "model_sha256": tokenizer_model_sha256(tok.get("model")),
    }


def check_same_tokenizer(
    prior_tok: dict[str, Any], where_prior: str, data_tok: dict[str, Any], where_data: str
) -> None:
    """Raise :class:`TokenDataError` when a token dataset's tokenizer (``data_tok``: its manifest's
    ``tokenizer``, or :func:`prior_tokenizer_identity`) is not the one a prior was trained on: T, K, or the
    tokenizer's weights (:func:`tokenizer_model_sha256`, when both sides know it) differ."""
    for key in ("tokens", "codebook_size"):
        if prior_tok.get(key) != data_tok.get(key):
            raise TokenDataError(
                f"{where_data}: field 'tokenizer.{key}' is {data_tok.get(key)}, but the prior "
                f"({where_prior}, meta.tokenizer.{key}) was trained on {prior_tok.get(key)}: a prior only "
                "models the ids of the tokenizer it was trained on"
            )
    a = prior_tok.get("model_sha256")
    b = data_tok.get("model_sha256") or tokenizer_model_sha256(data_tok.get("model"))
    if a and b and a != b:
        raise TokenDataError(
            f"{where_data}: the tokenizer ({data_tok.get('model')}) is not the one the prior was trained on "
            f"({where_prior}, meta.tokenizer.model_sha256 {a[:12]}... vs {b[:12]}...; same T and K, other "
            "weights): its ids mean other codes"
        )
