"""Issue 27.1: token datasets a next-stage (autoregressive) trainer can use as they are.

Labels (IDX1 beside IDX3 images, ImageFolder sub-folders), captions (.jsonl / .csv), ``--augment flip``,
``--vocab flat``, the exported codebooks, and reading the datasets without revq-ray (numpy + tarfile + json,
and Hugging Face ``datasets``' webdataset loader), all through `revq-ray tokenize` with a small real
tokenizer (tests/eval/conftest.py's tiny VAE + ReVQModel)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.eval


# ------------------------------------------------------------------------------------------- helpers
def write_idx(path: Path, arr: np.ndarray) -> Path:
    """An IDX unsigned-byte file (images (N, H, W): IDX3; labels (N,): IDX1), gzipped when named .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    data = head + arr.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def gray(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


@pytest.fixture(scope="module")
def bundle(tiny_assets):
    """A saved Tokenizer bundle (16x16 RGB images -> T=4 ids of K=16) and the Tokenizer itself."""
    from revq_ray.tokenizer import Tokenizer

    tok = Tokenizer.build(tiny_assets["vae_spec"], tiny_assets["model_dir"])
    path = tok.save_pretrained(tiny_assets["root"] / "bundle")
    return path, Tokenizer.from_pretrained(path)


def run_tokenize(*argv: str) -> int:
    from revq_ray.cli import main as cli

    return cli(["tokenize", *argv, "--ray", "never"])


def tar_items(root: Path, manifest: dict) -> list[tuple[dict, np.ndarray]]:
    """A shards dataset read with tarfile + numpy + json only (what any webdataset reader does)."""
    got: dict[str, dict] = {}
    for shard in sorted(root.glob("tokens-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                val = np.load(io.BytesIO(data)) if ext == "ids.npy" else json.loads(data)
                got.setdefault(key, {})[ext] = val
    return [(got[k]["json"], got[k]["ids.npy"]) for k in sorted(got)]


@pytest.fixture(scope="module")
def idx_dataset(bundle, tiny_assets, tmp_path_factory):
    """10 gray images in an IDX3 .gz with a labels file beside it; the first 8 tokenized with flips into
    webdataset shards of 5 items."""
    root = tmp_path_factory.mktemp("idx")
    images = gray(tiny_assets["images"][:10])
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    out = root / "tokens"
    code = run_tokenize(
        "--model", str(bundle[0]), "--input", str(root / "train-images-idx3-ubyte.gz"), "--output", str(out),
        "--limit", "8", "--augment", "flip", "--format", "shards", "--shard-size", "5",
    )  # fmt: skip
    assert code == 0
    return {"out": out, "images": images[:8], "labels": labels[:8]}


# ------------------------------------------------------------------------------------------- labels + flip
def test_idx_labels_and_flip(bundle, idx_dataset):
    """IDX3 images + the IDX1 labels beside them: labels per item (in the shards' json too), default names
    "0".."9", each image followed by its flipped copy (marked, same label); flipped ids are the ids of the
    mirror image and decode to it."""
    from revq_ray.tokenize import read_tokens

    tok, out, images, labels = bundle[1], idx_dataset["out"], idx_dataset["images"], idx_dataset["labels"]
    manifest, items = read_tokens(out)
    items = list(items)
    assert (
        manifest["version"] == 2 and manifest["vocab"] == "per_position" and manifest["augment"] == ["flip"]
    )
    assert manifest["labels"]["kind"] == "class" and manifest["labels"]["names"] == [
        str(i) for i in range(10)
    ]
    assert (
        manifest["labels"]["source"].endswith("train-labels-idx1-ubyte.gz")
        and manifest["labels"]["from"] == "idx1"
    )
    assert manifest["count"] == 16 and manifest["sources"] == 8 and manifest["limit"] == 8
    assert manifest["shards"] == [f"tokens-{i:06d}.tar" for i in range(4)]  # 16 items, 5 a shard
    assert manifest["codebooks"] == "codebooks.safetensors" and (out / "codebooks.safetensors").is_file()
    want = tok.encode(list(images)).numpy()  # gray (H, W) each -> RGB, as encode does
    want_flip = tok.encode(list(np.ascontiguousarray(images[:, :, ::-1]))).numpy()
    for j in range(8):
        (m0, ids0), (m1, ids1) = items[2 * j], items[2 * j + 1]
        assert m0["name"] == m1["name"] == f"{j:06d}" and m0["index"] == j
        assert "augment" not in m0 and m1["augment"] == "flip" and m1["source_key"] == m0["key"]
        assert m0["label"] == m1["label"] == int(labels[j])
        assert ids0.dtype == np.uint16 and ids0.shape == (4,)
        assert ids0.tolist() == want[j].tolist() and ids1.tolist() == want_flip[j].tolist()
    assert any(items[2 * j][1].tolist() != items[2 * j + 1][1].tolist() for j in range(8))
    # The per-item json inside the shards carries the same label / augment / source_key.
    assert [m for m, _ in tar_items(out, manifest)] == [
        {k: v for k, v in m.items() if k != "shard"} for m, _ in items
    ]
    # Flipped ids decode to (close to) the mirror image: closer to it than to the unflipped original.
    x = torch.from_numpy(images).float()[:, None].expand(-1, 3, -1, -1) / 255.0
    rec_flip = tok.decode(torch.from_numpy(want_flip.astype(np.int64)))
    d_mirror = float(((rec_flip - x.flip(-1)) ** 2).mean())
    d_orig = float(((rec_flip - x) ** 2).mean())
    assert d_mirror < d_orig, (d_mirror, d_orig)


def test_detokenize_a_flipped_dataset(bundle, idx_dataset, tmp_path):
    from PIL import Image

    from revq_ray.cli import main as cli
    from revq_ray.tokenize import read_tokens

    tok, out = bundle[1], idx_dataset["out"]
    media = tmp_path / "media"
    assert cli(["detokenize", "--input", str(out), "--output", str(media), "--ray", "never"]) == 0
    names = sorted(p.name for p in media.glob("*.png"))
    assert names == sorted([f"{j:06d}.png" for j in range(8)] + [f"{j:06d}_flip.png" for j in range(8)])
    _, items = read_tokens(out)
    for meta, ids in list(items)[:4]:
        rec = tok.decode(torch.from_numpy(ids.astype(np.int64))[None])[0]
        want = (rec.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        name = meta["name"] + ("_flip" if meta.get("augment") else "") + ".png"
        with Image.open(media / name) as im:
            assert np.array_equal(np.asarray(im), want)


# ------------------------------------------------------------------------------- readable anywhere
def test_shards_read_with_hugging_face_datasets(idx_dataset, tmp_path):
    """`datasets.load_dataset("webdataset", ...)` gets the same ids, labels and flip marks as read_tokens."""
    datasets = pytest.importorskip("datasets", reason="pip install datasets (in the dev extra)")
    from revq_ray.tokenize import read_tokens

    out = idx_dataset["out"]
    manifest, items = read_tokens(out)
    items = list(items)
    tars = [str(out / s) for s in manifest["shards"]]
    ds = datasets.load_dataset(
        "webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path)
    )
    assert len(ds) == manifest["count"] == 16
    for row, (meta, ids) in zip(ds, items):
        assert row["__key__"] == meta["key"]
        assert np.asarray(row["ids.npy"]).tolist() == ids.tolist()
        assert row["json"]["label"] == meta["label"] and row["json"]["name"] == meta["name"]
        assert row["json"]["augment"] == meta.get("augment") and row["json"]["source_key"] == meta.get(
            "source_key"
        )


def test_image_folder_labels_flat_vocab_npy_and_detokenize(bundle, tiny_assets, tmp_path):
    """ImageFolder classes (ids by sorted folder name), --vocab flat (id = t*K + k) in the npy format, read
    with json + numpy only; detokenize maps flat ids back and writes the same images as per-position ids."""
    from PIL import Image

    from revq_ray.cli import main as cli
    from revq_ray.tokenize import per_position_ids, read_tokens

    path, tok = bundle
    src = tmp_path / "photos"
    classes = ["zebra", "apple", "mango"]  # ids by sorted name: apple 0, mango 1, zebra 2
    for i, img in enumerate(tiny_assets["images"][:9]):
        (src / classes[i % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / classes[i % 3] / f"p{i}.png")
    out = tmp_path / "tokens"
    assert (
        run_tokenize("--model", str(path), "--input", str(src), "--output", str(out), "--vocab", "flat") == 0
    )
    # --limit keeps the classes of the whole layout (the first 2 files are both in apple/)
    from revq_ray.token_sources import build_source

    two = build_source(src, "image", limit=2, log=lambda _m: None)
    assert two.labels == [0, 0] and two.label_info["names"] == ["apple", "mango", "zebra"]
    # plain json + numpy
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab"] == "flat" and manifest["vocab_size"] == 64 and manifest["dtype"] == "uint16"
    assert manifest["labels"] == {
        "kind": "class", "names": ["apple", "mango", "zebra"], "source": str(src), "from": "folders",
        "count": {"apple": 3, "mango": 3, "zebra": 3},
    }  # fmt: skip
    T, K = manifest["tokenizer"]["tokens"], manifest["tokenizer"]["codebook_size"]
    for item in manifest["items"]:
        ids = np.load(out / item["file"])
        with Image.open(src / item["name"]) as im:
            k = tok.encode(im.convert("RGB"))[0].numpy()
        assert ids.tolist() == (np.arange(T) * K + k).tolist()
        assert item["label"] == ["apple", "mango", "zebra"].index(item["name"].split("/")[0])
    _, items = read_tokens(out)
    meta, ids = next(items)
    assert per_position_ids(ids, manifest).max() < K <= int(ids.max())
    with pytest.raises(ValueError, match="not a flat id"):
        per_position_ids(np.zeros(T, np.uint16) + K * T, manifest)
    # detokenize: the same pixels as the per-position ids of the same images
    out2 = tmp_path / "tokens_pp"
    assert (
        run_tokenize("--model", str(path), "--input", str(src), "--output", str(out2), "--labels", "none")
        == 0
    )
    assert "labels" not in json.loads((out2 / "manifest.json").read_text())
    for d, o in ((out, "m_flat"), (out2, "m_pp")):
        assert cli(["detokenize", "--input", str(d), "--output", str(tmp_path / o), "--ray", "never"]) == 0
    flat_pngs = sorted(p.relative_to(tmp_path / "m_flat") for p in (tmp_path / "m_flat").rglob("*.png"))
    assert len(flat_pngs) == 9 and Path("apple/p1.png") in flat_pngs
    for rel in flat_pngs:
        with Image.open(tmp_path / "m_flat" / rel) as a, Image.open(tmp_path / "m_pp" / rel) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_captions_jsonl_and_csv(bundle, tiny_assets, tmp_path):
    """Captions by file name (relative path, or a unique bare name) from .jsonl and .csv; unknown names are
    counted and warned about; items without one carry none; class folders and captions together."""
    from PIL import Image

    from revq_ray.tokenize import read_tokens

    path = bundle[0]
    src = tmp_path / "photos"
    for i, img in enumerate(tiny_assets["images"][:4]):
        (src / ("cats" if i < 2 else "dogs")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / ("cats" if i < 2 else "dogs") / f"p{i}.png")
    jl = tmp_path / "caps.jsonl"
    rows = [{"file": "cats/p0.png", "text": "a cat, sitting"}, {"file": "p2.png", "text": 'a dog "barking"'},
            {"file": "nowhere.png", "text": "lost"}]  # fmt: skip
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cv = tmp_path / "caps.csv"
    with cv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        w.writerows([(r["file"], r["text"]) for r in rows])
    logs: list[str] = []
    for caps, fmt in ((jl, "npy"), (cv, "shards")):
        out = tmp_path / f"t_{fmt}"
        args = ["--model", str(path), "--input", str(src), "--output", str(out), "--captions", str(caps)]
        assert run_tokenize(*args, "--format", fmt) == 0
        manifest, items = read_tokens(out)
        got = {m["name"]: (m.get("caption"), m["label"]) for m, _ in items}
        assert got == {
            "cats/p0.png": ("a cat, sitting", 0), "cats/p1.png": (None, 0),
            "dogs/p2.png": ('a dog "barking"', 1), "dogs/p3.png": (None, 1),
        }  # fmt: skip
        assert manifest["labels"]["kind"] == "class" and manifest["labels"]["names"] == ["cats", "dogs"]
        cap = manifest["captions"]
        assert (
            cap["kind"] == "caption"
            and cap["unmatched"] == 1
            and cap["unmatched_examples"] == ["nowhere.png"]
        )
        assert cap["items_with_caption"] == 2 and cap["items_without_caption"] == 2
        if fmt == "shards":  # the caption rides in the per-item json
            assert {m["name"]: m.get("caption") for m, _ in tar_items(out, manifest)}["cats/p0.png"] == (
                "a cat, sitting"
            )
    # captions alone: the manifest's "labels" is the caption entry
    from revq_ray.token_sources import build_source

    src_only = build_source(src, "image", labels="none", captions=str(jl), log=logs.append)
    assert src_only.label_info is None and src_only.captions[0] == "a cat, sitting"
    assert any("WARNING: 1 caption(s) name no input" in line for line in logs)


def test_ray_data_path_writes_the_same_dataset(bundle, idx_dataset, ray_local, tmp_path):
    """Above --ray-threshold inputs tokenize streams through Ray Data actors: the same items, ids, labels and
    flip marks, in the same order, as in this process (the flipped rows come out of the actors' batches)."""
    from revq_ray.cli import main as cli
    from revq_ray.tokenize import read_tokens

    idx = idx_dataset["out"].parent / "train-images-idx3-ubyte.gz"
    out = tmp_path / "ray"
    argv = ["--model", str(bundle[0]), "--input", str(idx), "--output", str(out), "--limit", "8"]
    argv += ["--augment", "flip", "--ray", "always", "--workers", "1", "--format", "npy"]
    assert cli(["tokenize", *argv]) == 0
    _, ray_items = read_tokens(out)
    _, local_items = read_tokens(idx_dataset["out"])
    drop = ("file", "shard")
    got = [({k: v for k, v in m.items() if k not in drop}, ids.tolist()) for m, ids in ray_items]
    want = [({k: v for k, v in m.items() if k not in drop}, ids.tolist()) for m, ids in local_items]
    assert len(got) == 16 and got == want


# ------------------------------------------------------------------------------------------- codebooks
@pytest.mark.parametrize("method", ["revq", "simvq", "gq"])
def test_exported_codebooks_are_what_decode_gathers(tiny_assets, method, tmp_path):
    """codebooks_tkd[t, k] is the vector the model's decode uses for id k at position t (before the layout
    and the rectifier), for every quantizer (SimVQ: the mapped codes; GQ: the shared prior samples)."""
    from safetensors.torch import load_file

    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenize import export_codebooks, write_codebooks

    model = ReVQModel(
        [4, 2, 2],
        {"quantizer": {"type": method, "tokens": 4, "codebook_size": 16}, "rectifier": {"type": "identity"}},
    )
    model.standardizer.fit([tiny_assets["latents"]])
    if method != "gq":
        model.init_codebook(tiny_assets["latents"], generator=torch.Generator().manual_seed(0))
    model.eval()
    meta = write_codebooks(model, tmp_path / "cb.safetensors")
    cb = load_file(str(tmp_path / "cb.safetensors"))["codebooks_tkd"]
    assert cb.shape == (4, 16, model.quantizer.dim) and cb.dtype == torch.float32
    assert torch.equal(cb, export_codebooks(model, chunk=5))  # chunking changes nothing
    assert meta["units"].startswith("raw" if method == "gq" else "standardized")
    ids = torch.randint(0, 16, (32, 4), generator=torch.Generator().manual_seed(1))
    gathered = cb[torch.arange(4)[None], ids]  # (B, T, d)
    with torch.no_grad():
        codes = model.quantizer.codes(ids)
        rec = model.decode(ids)
        from_export = model._rectify_and_destandardize(model._to_std(gathered))[1]
    if method == "simvq":
        # SimVQ's codes are a batched matmul of its frozen codebook: the last bit depends on the batch shape
        torch.testing.assert_close(gathered, codes, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(from_export, rec, rtol=1e-6, atol=1e-6)
    else:  # a plain row gather: bit-exact
        assert torch.equal(gathered, codes)
        assert torch.equal(from_export, rec)  # decoding from the exported vectors is decode(ids)
    # the flat vocabulary's embedding table is the reshape
    flat = torch.arange(4)[None] * 16 + ids
    assert torch.equal(cb.reshape(64, -1)[flat], gathered)


def test_tokenize_exports_the_bundles_codebooks(bundle, idx_dataset):
    from safetensors.torch import load_file

    from revq_ray.tokenize import export_codebooks

    cb = load_file(str(idx_dataset["out"] / "codebooks.safetensors"))["codebooks_tkd"]
    assert torch.equal(cb, export_codebooks(bundle[1].model))


# ------------------------------------------------------------------------------------------- errors
def _tokenize_error(path: Path, *argv: str) -> str:
    from revq_ray.tokenize import build_parser, tokenize

    args = build_parser().parse_args(["--model", str(path), *argv])
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        tokenize(args, log=lambda _m: None)
    return str(err.value)


def test_bad_labels_and_captions_fail_early_naming_the_file(bundle, tiny_assets, tmp_path):
    from PIL import Image

    path = bundle[0]
    images = gray(tiny_assets["images"][:6])
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    out = ["--output", str(tmp_path / "out")]
    img = ["--input", str(tmp_path / "train-images-idx3-ubyte"), *out]
    # a label count that is not the image count
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    msg = _tokenize_error(path, *img)
    assert "train-labels-idx1-ubyte: 5 labels for 6 images" in msg and "--labels" in msg
    # a label id outside the class names
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 1, 0, 2], np.uint8))
    msg = _tokenize_error(path, *img, "--class-names", "a,b")
    assert "label 2 of image 2 is out of range of the 2 class names" in msg and "--class-names" in msg
    # not a labels file
    (tmp_path / "bad-labels").write_bytes(b"\x00\x00\x08\x03" + bytes(20))
    assert "not an unsigned-byte label (IDX1) file" in _tokenize_error(
        path, *img, "--labels", str(tmp_path / "bad-labels")
    )
    assert not (tmp_path / "out").exists()  # nothing was written
    # captions naming no input
    src = tmp_path / "photos"
    (src / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(tiny_assets["images"][i]).save(src / "a" / f"p{i}.png")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"file": "other.png", "text": "x"}) + "\n")
    folder = ["--input", str(src), *out]
    assert "names an input" in _tokenize_error(path, *folder, "--captions", str(caps))
    caps.write_text('{"file": "a/p0.png"}\n')
    assert "caps.jsonl:1: needs the fields 'file' and 'text'" in _tokenize_error(
        path, *folder, "--captions", str(caps)
    )
    (tmp_path / "caps.csv").write_text("name,caption\np0.png,x\n")
    assert "columns 'file' and 'text'" in _tokenize_error(
        path, *folder, "--captions", str(tmp_path / "caps.csv")
    )
    # class folders: a top-level file with --labels folders; a folder missing from --class-names
    Image.fromarray(tiny_assets["images"][0]).save(src / "top.png")
    assert "is not in a class sub-folder" in _tokenize_error(path, *folder, "--labels", "folders")
    (src / "top.png").unlink()
    (src / "b").mkdir()
    Image.fromarray(tiny_assets["images"][0]).save(src / "b" / "q.png")
    assert "class folder(s) ['b'] are not in --class-names" in _tokenize_error(
        path, *folder, "--class-names", "a"
    )
    # --class-names without labels; a labels file for a folder
    assert "has no class labels" in _tokenize_error(path, *folder, "--labels", "none", "--class-names", "a,b")
    assert "a labels file goes with IDX images" in _tokenize_error(path, *folder, "--labels", str(caps))


@pytest.mark.shared
def test_real_fashion_mnist_labels(shared_dir, bundle, tmp_path):
    """The real Fashion-MNIST training file: its labels beside it, the ten class names, first 20 images."""
    from revq_ray.token_sources import FASHION_MNIST_CLASSES, read_idx_labels
    from revq_ray.tokenize import read_tokens

    fm = shared_dir / "data" / "fashion-mnist"
    out = tmp_path / "fm"
    args = [
        "--model",
        str(bundle[0]),
        "--input",
        str(fm / "train-images-idx3-ubyte.gz"),
        "--output",
        str(out),
    ]
    assert run_tokenize(*args, "--limit", "20") == 0
    manifest, items = read_tokens(out)
    assert manifest["labels"]["names"] == FASHION_MNIST_CLASSES and manifest["count"] == 20
    want = read_idx_labels(fm / "train-labels-idx1-ubyte.gz", limit=20).tolist()
    assert [m["label"] for m, _ in items] == want
    assert sum(manifest["labels"]["count"].values()) == 20
