"""What ``revq-ray tokenize`` reads: the input items, and a class label and/or a caption for each.

Inputs (``--input``):

- an image or audio folder (recursive, sorted) or one file: one item per file, named by its relative path;
- an IDX3 image file (MNIST / Fashion-MNIST ``*-images-idx3-ubyte[.gz]``): one item per image, named by
  its zero-padded index (``000012``); grayscale is replicated to RGB as ``revq-ray encode`` does.

``--limit N`` keeps the first N items (of the sorted files, or of the IDX file).

Class labels (``--labels``, default ``auto``):

- ``auto``: an IDX1 labels file beside IDX images, by the usual name (``train-images-idx3-ubyte[.gz]`` ->
  ``train-labels-idx1-ubyte[.gz]``), when it exists; for a folder, the class sub-folder layout (ImageFolder:
  ``input/<class>/<file>``) when EVERY file lies in a sub-folder (and there are at least two classes);
  otherwise no labels;
- ``folders``: the ImageFolder layout, required (a file at the top level is an error);
- ``none``: no labels;
- a path: an IDX1 labels file for IDX images (one label per image, in order).

Folder classes get ids by sorted folder name, or by their position in ``--class-names``. IDX labels are the
file's integers; their names come from ``--class-names``: a comma list (``a,b,c``), a text file with one name
per line, or ``fashion-mnist`` (its ten class names). Without it, ``auto``: the ten Fashion-MNIST names when
the labels file's name or its folder's contains "fashion" and every label is in 0..9, else the ids as strings
(``"0"``, ``"1"``, ...). Every label must be an index into the names.

Captions (``--captions FILE``): ``.jsonl`` lines ``{"file": ..., "text": ...}`` or a ``.csv`` with ``file``
and ``text`` columns; ``file`` is an item's name (its path relative to ``--input``; for IDX input its
index), or a bare file name when that is unique among the inputs. Captions naming no input are counted and
warned about; items without a caption have none.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IDX_UBYTE = 0x08
LABEL_MODES = ("auto", "folders", "none")


# ------------------------------------------------------------------------------------------- IDX files
def is_idx(path: Path) -> bool:
    """An IDX file by name (``*-ubyte[.gz]`` or ``idx3`` / ``idx1`` in the name)."""
    name = path.name.lower()
    return path.is_file() and ("idx3" in name or name.endswith("-ubyte") or name.endswith("-ubyte.gz"))


def _idx_header(path: Path, dims: int) -> tuple[Any, int]:
    opener = gzip.open if path.suffix == ".gz" else open
    f = opener(path, "rb")
    head = f.read(4 + 4 * dims)
    if len(head) < 4 + 4 * dims or head[:3] != bytes([0, 0, _IDX_UBYTE]) or head[3] != dims:
        f.close()
        kind = "image (IDX3)" if dims == 3 else "label (IDX1)"
        raise ValueError(
            f"{path}: not an unsigned-byte {kind} file (magic {head[:4].hex()}; expected 0000080{dims})"
        )
    return f, int.from_bytes(head[4:8], "big")


def idx_count(path: str | Path, dims: int = 3) -> int:
    """The item count an IDX file's header states (images for ``dims=3``, labels for ``dims=1``)."""
    f, n = _idx_header(Path(path), dims)
    f.close()
    return n


def read_idx_labels(path: str | Path, limit: int | None = None) -> np.ndarray:
    """An IDX1 unsigned-byte labels file (``*-labels-idx1-ubyte[.gz]``) -> int64 (N,); ``limit``: first N."""
    path = Path(path)
    f, n = _idx_header(path, 1)
    with f:
        n = n if limit is None else min(n, int(limit))
        data = f.read(n)
    if len(data) < n:
        raise ValueError(f"{path}: truncated IDX labels file ({len(data)} bytes for {n} labels)")
    return np.frombuffer(data, np.uint8).astype(np.int64)


def labels_beside(images: Path) -> Path | None:
    """The labels file an IDX images file usually has beside it (``-images-idx3-`` -> ``-labels-idx1-``)."""
    name = images.name
    if "images-idx3" not in name:
        return None
    stem = name.replace("images-idx3", "labels-idx1").removesuffix(".gz")
    for cand in (stem, stem + ".gz"):
        if (images.parent / cand).is_file():
            return images.parent / cand
    return None


# ------------------------------------------------------------------------------------------- names
def parse_class_names(spec: str | None) -> list[str] | None:
    """``--class-names``: None/"auto" -> None; "fashion-mnist"; a text file (one name a line); "a,b,c"."""
    if spec is None or spec == "auto":
        return None
    if spec.lower().replace("_", "-") == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    p = Path(spec).expanduser()
    if p.is_file():
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not names:
            raise ValueError(f"--class-names {spec!r}: the file lists no names (one name a line)")
    else:
        names = [s.strip() for s in spec.split(",")]
        if any(not s for s in names):
            raise ValueError(
                f"--class-names {spec!r}: an empty name (a comma list like 'cat,dog', or a file)"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"--class-names {spec!r}: a name is listed twice")
    return names


def _default_names(labels: np.ndarray, source: Path) -> list[str]:
    top = int(labels.max()) + 1 if labels.size else 0
    # The file's own name and its folder's only: MNIST and Fashion-MNIST files have the same names.
    if "fashion" in f"{source.parent.name}/{source.name}".lower() and top <= len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(top)]


# ------------------------------------------------------------------------------------------- captions
def read_captions(path: str | Path) -> dict[str, str]:
    """A captions file -> {file: text}: ``.jsonl`` ({"file", "text"} a line) or ``.csv`` (file,text)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--captions {str(p)!r} does not exist")
    out: dict[str, str] = {}
    fix = 'each line a JSON object {"file": "<name under --input>", "text": "<caption>"}'
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{p}:{n}: not JSON ({err}); {fix}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "file" not in row:
                raise ValueError(f"{p}:{n}: needs the fields 'file' and 'text' (a string); {fix}")
            out[str(row["file"])] = row["text"]
    elif p.suffix.lower() == ".csv":
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "text"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{p}: a captions .csv needs a header with the columns 'file' and 'text' "
                    f"(got {reader.fieldnames})"
                )
            for row in reader:
                out[row["file"]] = row["text"] or ""
    else:
        raise ValueError(f"--captions {str(p)!r}: expected a .jsonl or .csv file")
    if not out:
        raise ValueError(f"{p}: no captions in the file")
    return out


# ------------------------------------------------------------------------------------------- the source
@dataclass
class Source:
    """The items to tokenize, in order, with what the manifest says about their labels and captions.

    ``items``: {"name", "path", "index"} (``index``: the image's position in an IDX file, else -1).
    ``labels``: one class id per item (or None); ``captions``: one caption or None per item (or None).
    """

    kind: str  # "files" or "idx"
    items: list[dict[str, Any]]
    labels: list[int] | None = None
    label_info: dict[str, Any] | None = None
    captions: list[str | None] | None = None
    caption_info: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _list_files(p: Path, modality: str) -> list[tuple[str, Path]]:
    from revq_ray.vae.audio import list_audio_files
    from revq_ray.vae.images import list_image_files

    files = list_audio_files(p) if modality == "audio" else list_image_files(p)
    if not files:
        kind = "audio (.wav/.flac/...)" if modality == "audio" else "image (.png/.jpg/...)"
        raise FileNotFoundError(f"--input {str(p)!r}: no {kind} files for this {modality} tokenizer")
    return [(Path(f.relative_to(p)).as_posix() if p.is_dir() else f.name, f) for f in files]


def _folder_labels(
    names: list[str], mode: str, class_names: list[str] | None, root: Path
) -> tuple[list[int], dict[str, Any]] | None:
    parts = [n.split("/") for n in names]
    nested = all(len(pp) >= 2 for pp in parts)
    if mode == "auto" and (not nested or len({pp[0] for pp in parts}) < 2):
        return None
    if not nested:
        top = next(n for n, pp in zip(names, parts) if len(pp) < 2)
        raise ValueError(
            f"--labels folders: {str(root / top)!r} is not in a class sub-folder (the layout is "
            "input/<class>/<file>; move it into one, or use --labels none)"
        )
    folders = sorted({pp[0] for pp in parts})
    if class_names is None:
        class_names = folders
    unknown = [f for f in folders if f not in class_names]
    if unknown:
        raise ValueError(
            f"--input {str(root)!r}: class folder(s) {unknown[:5]} are not in --class-names {class_names} "
            "(name every folder there, or leave --class-names out to use the sorted folder names)"
        )
    ids = {n: i for i, n in enumerate(class_names)}
    info = {"kind": "class", "names": class_names, "source": str(root), "from": "folders", "count": {}}
    return [ids[pp[0]] for pp in parts], info


def _idx_labels(
    images: Path, n_images: int, mode: str, class_names: list[str] | None, limit: int | None
) -> tuple[list[int], dict[str, Any]] | None:
    if mode == "none":
        return None
    if mode == "folders":
        raise ValueError(f"--labels folders: --input {str(images)!r} is an IDX file, not a folder of classes")
    src = labels_beside(images) if mode == "auto" else Path(mode).expanduser()
    if src is None:
        return None
    if not src.is_file():
        raise FileNotFoundError(f"--labels {str(src)!r} does not exist (an IDX1 labels file, or auto / none)")
    n_labels = idx_count(src, dims=1)
    if n_labels != n_images:
        raise ValueError(
            f"{src}: {n_labels} labels for {n_images} images in {images} (the labels file must belong to "
            "these images: pass the right one with --labels FILE, or --labels none)"
        )
    labels = read_idx_labels(src)  # all of them: the names and the checks do not depend on --limit
    names = class_names if class_names is not None else _default_names(labels, src)
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{src}: label {int(labels[i])} of image {i} is out of range of the {len(names)} class names "
            f"{names[:12]} (give every class a name with --class-names)"
        )
    return labels[:limit].tolist(), {"kind": "class", "names": names, "source": str(src), "from": "idx1"}


def _match_captions(
    caps: dict[str, str], names: list[str], idx_input: bool
) -> tuple[list[str | None], list[str]]:
    pos = {n: i for i, n in enumerate(names)}
    base: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        base.setdefault(n.rsplit("/", 1)[-1], []).append(i)
    out: list[str | None] = [None] * len(names)
    unmatched = []
    for key, text in caps.items():
        k = key.replace("\\", "/").removeprefix("./")
        if k in pos:
            out[pos[k]] = text
        elif idx_input and re.fullmatch(r"\d+", k) and int(k) < len(names):
            out[int(k)] = text
        elif len(base.get(k, [])) == 1:
            out[base[k][0]] = text
        else:
            unmatched.append(key)
    return out, unmatched


def build_source(
    input_path: str | Path,
    modality: str,
    labels: str = "auto",
    class_names: str | None = None,
    captions: str | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> Source:
    """Resolve ``--input``, ``--labels``, ``--class-names``, ``--captions``, ``--limit`` (module docstring).

    Every check that can fail runs here, before any item is tokenized."""
    p = Path(input_path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--input {str(p)!r} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be at least 1")
    names_given = parse_class_names(class_names)
    if p.is_file() and is_idx(p):
        if modality != "image":
            raise ValueError(f"--input {str(p)!r}: an IDX image file, but the tokenizer is for {modality}")
        n_all = idx_count(p, dims=3)
        n = n_all if limit is None else min(n_all, limit)
        width = max(6, len(str(n_all - 1)))
        src = Source("idx", [{"name": f"{i:0{width}d}", "path": str(p), "index": i} for i in range(n)])
        got = _idx_labels(p, n_all, labels, names_given, limit)
    else:
        files = _list_files(p, modality)
        src = Source("files", [{"name": n, "path": str(f), "index": -1} for n, f in files])
        if labels not in LABEL_MODES:
            raise ValueError(
                f"--labels {labels!r}: a labels file goes with IDX images; for a folder use "
                "--labels folders (input/<class>/<file>), auto or none"
            )
        got = None if labels == "none" or not p.is_dir() else _folder_labels(
            [it["name"] for it in src.items], labels, names_given, p
        )  # fmt: skip
        # The layout is judged on every file, so --limit never changes the classes or their ids.
        src.items = src.items[:limit]
        if got is not None:
            got = (got[0][:limit], got[1])
    if got is None and names_given is not None:
        raise ValueError(f"--class-names given, but --input {str(p)!r} has no class labels (see --labels)")
    if got is not None:
        src.labels, src.label_info = got
        counts = np.bincount(np.asarray(src.labels, dtype=np.int64), minlength=len(src.label_info["names"]))
        src.label_info["count"] = {n: int(c) for n, c in zip(src.label_info["names"], counts)}
        names = src.label_info["names"]
        more = ", ..." if len(names) > 10 else ""
        src.notes.append(
            f"class labels from {src.label_info['source']}: {len(names)} classes "
            f"({', '.join(names[:10])}{more})"
        )
    if captions:
        caps = read_captions(captions)
        matched, unmatched = _match_captions(caps, [it["name"] for it in src.items], src.kind == "idx")
        have = sum(c is not None for c in matched)
        if have == 0:
            raise ValueError(
                f"--captions {captions!r}: none of its {len(caps)} 'file' entries "
                f"(e.g. {next(iter(caps))!r}) names an input "
                f"(e.g. {src.items[0]['name']!r}: paths relative to --input)"
            )
        src.captions = matched
        src.caption_info = {
            "kind": "caption",
            "source": str(Path(captions).expanduser()),
            "items_with_caption": have,
            "items_without_caption": len(matched) - have,
            "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:10],
        }
        src.notes.append(f"captions from {captions}: {have} of {len(matched)} items have one")
        if unmatched:
            src.notes.append(
                f"WARNING: {len(unmatched)} caption(s) name no input (e.g. {unmatched[:3]}); counted in the "
                "manifest, not written"
            )
    for note in src.notes:
        log(f"[tokenize] {note}")
    return src
