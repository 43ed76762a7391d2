"""Which tokenizer makes the better prior (issue 27.3): Fashion-MNIST tokenizers judged by the class-
conditional prior trained on their tokens, with one fixed prior recipe and budget for all.

    python benchmarks/prior_study.py tokenizers   # encode (study_fmnist prepare), train + evaluate tokenizers
    python benchmarks/prior_study.py judge        # train the judge (revq_ray.eval.judge) on images [0, 50000)
    python benchmarks/prior_study.py priors       # per row: tokenize, train the prior, sample, score
    python benchmarks/prior_study.py report       # JSON, table, grids from what finished
    python benchmarks/prior_study.py all          # the four in order

Every stage keeps what finished (a rerun resumes: tokenizer runs and their evaluations, token datasets, prior
runs, samples and scores are files under ``runs/prior_study`` and ``runs/study_fmnist``); ``--rows`` picks
rows.

The rows (tokenizers), all on the taef2 latents of the first 10,240 Fashion-MNIST training images (64 x 64,
latent 32x8x8), trained by ``benchmarks/study_fmnist.py``'s machinery (Ray Train + DeepSpeed on CPU):

- ``revq_2048``: ``configs/fashion_mnist_2048.yaml`` as committed (study_fmnist's ``tuned`` row): ReVQ,
  T256 K256, position layout, decoder weighting, vit 32x3 rectifier, 1,000 steps of 128;
- ``vq_2048``: study_fmnist's ``vq_weighted`` row: plain VQ (no reset, no rectifier) at the same T, K, layout,
  weighting, lr and steps. The fair comparison: it differs from ``revq_2048`` only by what ReVQ adds (the
  ``vq`` row also changes the layout and weighting, which the Quality study showed is worth ~5 dB by itself);
- ``revq_512``: the tuned recipe at a quarter of the bits by cutting the tokens: T64 K256 (64 positions x 1
  group of 32 channels), everything else as ``revq_2048``. Same vocabulary per position, a quarter of the
  sequence. (The first version of this study, at a 600-step prior budget on 10,240 images, had a 1,024-bit
  row, T128; its priors learned no class at all, see README.)

The prior (``revq_ray.prior``, ``configs/prior_fashion_mnist.yaml`` plus ``prior_overrides``) trains on the
ids of the first ``--prior-items`` (50,000) training images with their class labels: the judge's training
range, so nothing the judge is scored against was seen by a prior. Their latents are encoded once for every
row (``runs/prior_study/latents``; ``prior_latents``) and turned into ids by ``revq_ray.tokenize.tokenize``
itself (``stage_tokens``). Every row gets the same recipe and step budget (1,500 steps of 32, one epoch of
those images: no image is seen twice, so the rows are compared before any prior can overfit). Samples:
``--per-class`` (50) per class at a fixed guidance scale and temperature.

The judge (``revq_ray.eval.judge``): trained on training images [0, 50000); everything it scores against is
from [50000, 60000), which no tokenizer, prior or judge trained on: its accuracy on all 10,000; the FD
reference set is [50000, 59500); the reconstruction sets are [59500, 60000) (500 images, within the 512
held-out PNGs the PSNR is measured on). Every set the FD compares has 500 images (FD is biased by the set
size). Images go to the judge through one transform: grey, 28 x 28 (64 x 64 decodes are downsampled,
antialiased bilinear). The distance rows, from the floor up:

- real: 500 held-out real images vs the reference (the FD of two real sets of these sizes: the noise floor);
- resize: the same images resized to the VAE's 64 x 64 input and back (what the pipeline's resize costs);
- VAE: taef2 encode -> decode of those images;
- tokenizer: image -> ids -> image with the row's tokenizer;
- samples: the prior's samples (50 per class).

Writes ``benchmarks/results/prior_study.json``, ``benchmarks/results/prior_study_<row>.png`` (10 samples per
class, one row per class) and prints the markdown table. Needs ../shared (never read by the package).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OUT = ROOT / "runs" / "prior_study"
RESULTS = ROOT / "benchmarks" / "results"
ROWS = ("revq_2048", "vq_2048", "revq_512")
PRIOR_STEPS = 1500  # the study's prior budget (steps of 32); another --prior-steps is a separate variant
PRIOR_ITEMS = 50000  # the prior trains on images [0, 50000): the judge's training range, never its held-out
STUDY_ITEMS = 10240  # what study_fmnist's prepare encodes (the tokenizers train on these)
PRIOR_CONFIG = ROOT / "configs" / "prior_fashion_mnist.yaml"
JUDGE_TRAIN = (0, 50000)
REF = (50000, 59500)
EVAL = (59500, 60000)
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _log(msg: str) -> None:
    print(f"[prior_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _idx(shared: Path) -> tuple[Path, Path]:
    d = shared / "data" / "fashion-mnist"
    return d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz"


def load_fmnist(shared: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 60,000 training images (uint8 (N, 28, 28)) and labels (int64 (N,))."""
    img, lab = _idx(shared)
    with gzip.open(img) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def vae_spec(shared: Path) -> str:
    return f"taesd:{(shared / 'models' / 'taef2').resolve()}"


# ------------------------------------------------------------------------------------------- tokenizers
def tokenizer_configs(steps: int | None) -> dict[str, dict[str, Any]]:
    """The rows' tokenizer configs (study_fmnist's config dicts; ``steps`` overrides max_steps, named so)."""
    from study_fmnist import row_configs

    from revq_ray.runtime import set_dotted

    r2048 = row_configs(2048)
    rows = {"revq_2048": r2048["tuned"], "vq_2048": r2048["vq_weighted"]}
    quarter = json.loads(json.dumps(r2048["tuned"]))
    set_dotted(quarter, "model.quantizer.tokens", 64)  # 64 positions x 1 group of 32 channels, K stays 256
    quarter["name"] = "fmnist512_tuned_t64"
    rows["revq_512"] = quarter
    if steps is not None:
        for cfg in rows.values():
            set_dotted(cfg, "train.max_steps", steps)
            cfg["name"] = f"{cfg['name']}_s{steps}"
    return rows


def stage_tokenizers(args: argparse.Namespace) -> int:
    import study_fmnist as S

    from revq_ray.runtime import init_ray

    if not (S.OUT / "latents" / "train" / "manifest.json").is_file() or not (S.OUT / "heldout_png").is_dir():
        rc = S.prepare(argparse.Namespace(shared=args.shared, train_items=STUDY_ITEMS, heldout=512))
        if rc:
            return rc
    init_ray()
    for row, cfg in tokenizer_configs(args.tok_steps).items():
        if row not in args.rows:
            continue
        done = OUT / row / "tokenizer.json"
        if done.is_file():
            _log(f"{row}: tokenizer done ({done})")
            continue
        _log(f"{row}: training {cfg['name']} (then evaluating on the held-out PNGs)")
        t0 = time.perf_counter()
        rec = S._train_and_eval(cfg, vae_spec(args.shared), S.OUT / "heldout_png")
        rec["run_dir"] = str(S.OUT / "runs" / cfg["name"])
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(rec, indent=2, default=str))
        _log(f"{row}: PSNR tokenized {rec['summary']['psnr_tokenized']:.2f} dB ({rec['wall_s']} s)")
    return 0


def _tokenizer_rec(row: str) -> dict[str, Any]:
    path = OUT / row / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"error: {row}: no tokenizer yet; run `python benchmarks/prior_study.py tokenizers`")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- judge
def stage_judge(args: argparse.Namespace) -> int:
    import torch

    from revq_ray.eval.judge import Judge, train_judge

    jdir = OUT / "judge"
    if (jdir / "judge.json").is_file() and "heldout_accuracy" in Judge.load(jdir).info:
        _log(f"judge done: held-out accuracy {Judge.load(jdir).info['heldout_accuracy']:.4f}")
        return 0
    torch.set_num_threads(args.threads)
    images, labels = load_fmnist(args.shared)
    a, b = JUDGE_TRAIN
    t0 = time.perf_counter()
    judge = train_judge(images[a:b], labels[a:b], epochs=args.judge_epochs, seed=0, log=_log)
    train_s = time.perf_counter() - t0
    ha, hb = JUDGE_TRAIN[1], len(images)
    acc = judge.accuracy(images[ha:hb], labels[ha:hb])
    judge.info.update(
        heldout_accuracy=acc, heldout=[ha, hb], train_range=list(JUDGE_TRAIN), train_s=round(train_s, 1),
        threads=args.threads,
    )  # fmt: skip
    judge.save(jdir)
    _log(f"judge: held-out accuracy {acc:.4f} on images [{ha}, {hb}) ({train_s:.0f} s)")
    return 0


# ------------------------------------------------------------------------------------------- priors
def _run(cmd: list[str], log_file: Path) -> None:
    """A subprocess with this tree first on PYTHONPATH, its output to ``log_file`` (its tail on failure)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    _log("$ " + " ".join(cmd))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited {proc.returncode}; {log_file}:\n{tail}")


def prior_overrides(args: argparse.Namespace) -> list[str]:
    """The fixed prior recipe's overrides: the same for every row (only the token dataset differs)."""
    # epochs out of the way: the step budget ends every run (the preset's epochs: 1 would end it first)
    # one thread: on the shared 2-core machine two threads contend (configs/prior_fashion_mnist.yaml's note)
    return [
        "train.epochs=1000", f"train.max_steps={args.prior_steps}", "train.torch_threads=1",
        "train.cpus_per_worker=1", *args.prior_set,
    ]  # fmt: skip


def _tokenize_argv(row: str, out: Path, args: argparse.Namespace) -> list[str]:
    """``revq-ray tokenize``'s arguments for a row: the first ``--prior-items`` training images, their labels
    from the IDX1 file beside them (``--labels auto``), webdataset shards."""
    img, _ = _idx(args.shared)
    return [
        "--model", _tokenizer_rec(row)["run_dir"], "--vae", vae_spec(args.shared), "--input", str(img),
        "--limit", str(args.prior_items), "--output", str(out), "--format", "shards",
    ]  # fmt: skip


def read_latents(shards: Path, n: int) -> np.ndarray:
    """The first ``n`` latents of a study_fmnist latent shard folder, in image order (key = image index)."""
    import io
    import tarfile

    out: dict[int, np.ndarray] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = Path(m.name).name.partition(".")
                if ext == "latent.npy" and int(key) < n:
                    out[int(key)] = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
    if sorted(out) != list(range(n)):
        raise SystemExit(f"error: {shards} holds {len(out)} of the first {n} latents; run `tokenizers` first")
    return np.stack([out[i] for i in range(n)]).astype(np.float32)


def prior_latents(args: argparse.Namespace) -> Path:
    """The taef2 latents of the prior's images: study_fmnist's (the first 10,240) when they suffice, else the
    first ``--prior-items`` encoded once into ``runs/prior_study/latents`` (same encode, same 64 x 64 front
    end; resumable), shared by every row."""
    import study_fmnist as S

    if args.prior_items <= STUDY_ITEMS:
        return S.OUT / "latents" / "train"
    from revq_ray.data.encode import encode_to_shards
    from revq_ray.runtime import init_ray

    out = OUT / "latents"
    if not (out / "manifest.json").is_file():
        _log(f"encoding the first {args.prior_items} training images for the priors (once, for every row)")
        init_ray()
        res = encode_to_shards(
            str(_idx(args.shared)[0]), vae_spec(args.shared), str(out), limit=args.prior_items, image_size=64,
            shard_size=1024, batch_size=128, num_actors=2, device="cpu", progress=True,
        )  # fmt: skip
        _log(f"prior latents: {res.summary()}")
    return out


def stage_tokens(row: str, args: argparse.Namespace) -> Path:
    """The prior's token dataset for a row (a `revq-ray tokenize` output directory).

    ``--tokenize cli`` runs the command itself (the taef2 encode of every image again, per row). The default,
    ``latents``, runs the same ``revq_ray.tokenize.tokenize`` (same item list, labels, manifest, codebooks)
    with its encode step swapped for the latents study_fmnist's ``prepare`` already encoded from the same
    images (same taef2, same 64 x 64 front end): on 2 shared cores the encode is ~10 minutes per row. The
    swap is checked: the ids of the first 256 images through the image path are compared, recorded in
    ``tokens/check.json``.
    """
    tok_dir = OUT / row / "tokens"
    if (tok_dir / "manifest.json").is_file():
        return tok_dir
    tmp = OUT / row / "tokens.partial"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    argv = _tokenize_argv(row, tmp, args)
    if args.tokenize == "cli":
        _run([sys.executable, "-m", "revq_ray", "tokenize", *argv], OUT / row / "tokenize.log")
        check = {"path": "revq-ray tokenize (images through taef2)"}
    else:
        check = _tokenize_from_latents(row, argv, args)
    (tmp / "check.json").write_text(json.dumps(check, indent=2))
    tmp.rename(tok_dir)
    return tok_dir


def _tokenize_from_latents(row: str, argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import io

    import torch

    from revq_ray import tokenize as T
    from revq_ray.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    targs = T.build_parser().parse_args(argv)
    tok = Tokenizer.from_pretrained(targs.model, vae=targs.vae)
    latents = torch.from_numpy(read_latents(prior_latents(args), args.prior_items))
    ids = torch.cat([tok.encode_latents(latents[i : i + 512]).cpu() for i in range(0, len(latents), 512)])
    ids = ids.numpy()
    dtype = T._id_dtype(T.vocab_size(tok.tokens, tok.codebook_size, "per_position"))
    # the check: the image path (what the CLI runs) on the first 256 images
    fn = T.TokenizeFn(targs.model, targs.vae, limit=args.prior_items)
    img, _ = _idx(args.shared)
    items = [{"i": i, "name": f"{i:05d}", "path": str(img), "index": i} for i in range(256)]
    direct = np.stack([np.load(io.BytesIO(r["ids"])) for r in fn.rows(items)])
    same = float((direct == ids[:256]).mean())

    def stream(items: list[dict[str, Any]], _args: Any, _log: Any):
        for it in items:
            buf = io.BytesIO()
            np.save(buf, ids[int(it["index"])].astype(dtype), allow_pickle=False)
            meta = {"name": it["name"], "shape": [tok.tokens], "index": int(it["index"])}
            yield {
                "i": int(it["i"]),
                "name": it["name"],
                "ids": buf.getvalue(),
                "meta": json.dumps(meta),
                "error": "",
            }

    T._stream = stream  # the encode step only: items, labels, writer, manifest and codebooks are the CLI's
    T.tokenize(targs, log=_log)
    check = {
        "path": "revq_ray.tokenize.tokenize with the encode step read from study_fmnist's latents",
        "ids_equal_to_image_path_first_256": same,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _log(f"{row}: tokens from latents; {100 * same:.2f}% of the first 256 images' ids equal the image path's")
    return check


def pkey(row: str, steps: int) -> str:
    """Where a row's prior, samples and score live: the row at the study's budget, ``<row>_s<steps>`` else."""
    return row if steps == PRIOR_STEPS else f"{row}_s{steps}"


def stage_prior(row: str, tokens: Path, args: argparse.Namespace) -> Path:
    out = OUT / "priors"
    key = pkey(row, args.prior_steps)
    name = f"prior_{key}"
    done = OUT / key / "prior.json"
    if done.is_file():
        return out / name
    cmd = [
        sys.executable, "-m", "revq_ray.prior", "--config", str(PRIOR_CONFIG),
        "--set", f"data.tokens={tokens}", "--set", f"name={name}", "--set", f"output_dir={out}",
    ]  # fmt: skip
    for o in prior_overrides(args):
        cmd += ["--set", o]
    t0 = time.perf_counter()
    _run(cmd, OUT / key / "prior.log")
    done.write_text(
        json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "overrides": prior_overrides(args)})
    )
    return out / name


def stage_sample(row: str, prior: Path, args: argparse.Namespace) -> Path:
    out = OUT / pkey(row, args.prior_steps) / "samples"
    if (out / "sample_done.json").is_file():
        return out
    rec = _tokenizer_rec(row)
    t0 = time.perf_counter()
    _run(
        [
            sys.executable, "-m", "revq_ray", "sample", "--prior", str(prior), "--tokenizer", rec["run_dir"],
            "--vae", vae_spec(args.shared), "--classes", ",".join(str(c) for c in range(10)),
            "--n", str(args.per_class), "--guidance", str(args.guidance),
            "--temperature", str(args.temperature),
            "--seed", "0", "--threads", "1", "--output", str(out),
        ],
        OUT / pkey(row, args.prior_steps) / "sample.log",
    )  # fmt: skip
    (out / "sample_done.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - t0, 1)}))
    return out


def read_samples(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The samples a `revq-ray sample` run wrote: images (N, H, W) uint8 and the class each was asked for."""
    from PIL import Image

    files = json.loads((out / "samples.json").read_text())["files"]  # <class:03d>_<i:04d>.png
    images = np.stack([np.asarray(Image.open(out / f).convert("L")) for f in files])
    return images, np.asarray([int(f.split("_")[0]) for f in files], dtype=np.int64)


class Scorer:
    """The judge, its reference features and the reconstruction sets, loaded once per process."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from revq_ray.eval.judge import Judge

        torch.set_num_threads(args.threads)
        self.judge = Judge.load(OUT / "judge")
        images, labels = load_fmnist(args.shared)
        self.ref = self.judge.features(images[REF[0] : REF[1]])
        self.eval_images, self.eval_labels = images[EVAL[0] : EVAL[1]], labels[EVAL[0] : EVAL[1]]

    def score(self, images: Any, labels: np.ndarray) -> dict[str, float]:
        from revq_ray.eval.judge import frechet_distance

        return {
            "class_accuracy": self.judge.accuracy(images, labels),
            "fd": frechet_distance(self.judge.features(images), self.ref),
        }


def reconstructions(scorer: Scorer, run_dir: str | None, args: argparse.Namespace) -> dict[str, dict]:
    """FD and class accuracy of the held-out set [59500, 60000): as is, resized, through the VAE and (with
    ``run_dir``) through the tokenizer."""
    import torch

    from revq_ray.tokenizer import Tokenizer

    if run_dir is None:  # the VAE alone: any row's tokenizer carries the same taef2
        run_dir = _tokenizer_rec(next(r for r in ROWS if (OUT / r / "tokenizer.json").is_file()))["run_dir"]
        tok = Tokenizer.from_pretrained(run_dir, vae=vae_spec(args.shared))
        x = tok.preprocess(list(scorer.eval_images))  # (B, 3, 64, 64) in [0, 1]: the VAE's input
        with torch.no_grad():
            vae = torch.cat(
                [
                    tok.postprocess(tok.vae.decode(tok.vae.encode(x[i : i + 100])))
                    for i in range(0, len(x), 100)
                ]
            )
        return {
            "real": scorer.score(scorer.eval_images, scorer.eval_labels),
            "resize": scorer.score(x, scorer.eval_labels),
            "vae": scorer.score(vae, scorer.eval_labels),
        }
    tok = Tokenizer.from_pretrained(run_dir, vae=vae_spec(args.shared))
    rec = tok.reconstruct(list(scorer.eval_images))
    return {"tokenizer": scorer.score(rec, scorer.eval_labels)}


def stage_priors(args: argparse.Namespace) -> int:
    if not (OUT / "judge" / "judge.json").is_file():
        _log("training the judge first")
        stage_judge(args)
    scorer = None
    for row in args.rows:
        score_file = OUT / pkey(row, args.prior_steps) / "score.json"
        if score_file.is_file():
            _log(f"{row}: scored ({score_file})")
            continue
        tokens = stage_tokens(row, args)
        _log(f"{row}: tokens at {tokens}")
        prior = stage_prior(row, tokens, args)
        _log(f"{row}: prior at {prior}")
        samples = stage_sample(row, prior, args)
        scorer = scorer or Scorer(args)
        images, asked = read_samples(samples)
        res = {
            "samples": {**scorer.score(images, asked), "n": int(len(images))},
            **reconstructions(scorer, _tokenizer_rec(row)["run_dir"], args),
        }
        score_file.write_text(json.dumps(res, indent=2))
        _log(f"{row}: {json.dumps(res)}")
    base = OUT / "baselines.json"
    if not base.is_file() and any((OUT / r / "tokenizer.json").is_file() for r in ROWS):
        scorer = scorer or Scorer(args)
        base.write_text(json.dumps(reconstructions(scorer, None, args), indent=2))
    return 0


# ------------------------------------------------------------------------------------------- report
def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def prior_val(key: str) -> dict[str, Any] | None:
    """The prior run's validations (metrics.csv): the best (lowest val_loss: ``export/best``, the checkpoint
    ``revq-ray sample`` loads) and the last; nats per token and bits per image on its held-out items."""
    import csv

    path = OUT / "priors" / f"prior_{key}" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    vals = [r for r in rows if r.get("val_loss") not in (None, "")]
    if not vals:
        return None

    def pick(r: dict[str, str]) -> dict[str, Any]:
        return {
            "step": int(float(r["step"])),
            "val_loss": float(r["val_loss"]),
            "val_bits": float(r["val_bits"]),
        }

    best = min(vals, key=lambda r: float(r["val_loss"]))
    return {**pick(best), "last": pick(vals[-1]), "last_train_loss": float(rows[-1]["loss"])}


def label_information(row: str, key: str, items: int = 500) -> dict[str, Any] | None:
    """How much the prior's predictions use the class: its mean cross-entropy per image (nats, summed over
    the T ids) on up to ``items`` of its held-out items given their true label, the null class (no label) and
    a shuffled label. true < null by about ln(10) = 2.3 nats would mean the label is fully used; ~0 means
    ignored. Kept in ``runs/prior_study/<key>/label_information.json``."""
    import torch

    from revq_ray.prior import load_prior
    from revq_ray.prior.data import load_token_dataset

    path = OUT / key / "label_information.json"
    if path.is_file():
        return json.loads(path.read_text())
    run, tokens = OUT / "priors" / f"prior_{key}", OUT / row / "tokens"
    if not (run / "metrics.csv").is_file() or not (tokens / "manifest.json").is_file():
        return None
    prior = load_prior(run).eval()
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    data = load_token_dataset(str(tokens), val_items=int(cfg.get("data", {}).get("val_items", 1000)))
    ids = torch.from_numpy(data.ids[data.val][:items])
    labels = torch.from_numpy(data.labels[data.val][:items])
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"items": int(len(ids))}
    with torch.no_grad():
        for name, lab in (
            ("true", labels),
            ("null", torch.full_like(labels, prior.spec.null_class)),
            ("shuffled", labels[torch.randperm(len(labels), generator=gen)]),
        ):
            logits = prior(ids, lab)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
            out[f"nats_per_image_{name}"] = round(float(nll.sum(1).mean()), 2)
    path.write_text(json.dumps(out, indent=2))
    return out


def stage_report(args: argparse.Namespace) -> int:
    judge = _read(OUT / "judge" / "judge.json")
    base = _read(OUT / "baselines.json")
    rows = []
    keys = [(row, row, PRIOR_STEPS) for row in ROWS]  # the study; then other budgets that were run
    keys += [  # a variant is listed once it is scored
        (r, p.name, int(p.name.rsplit("_s", 1)[1]))
        for r in ROWS
        for p in sorted(OUT.glob(f"{r}_s*"))
        if (p / "score.json").is_file()
    ]
    for row, key, steps in keys:
        tok, score = _read(OUT / row / "tokenizer.json"), _read(OUT / key / "score.json")
        prior = _read(OUT / key / "prior.json")
        sample = _read(OUT / key / "samples" / "sample_done.json")
        info = _read(OUT / key / "samples" / "samples.json")
        if sample is not None and info is not None:
            sample.update({k: info.get(k) for k in ("samples_per_s", "sampling_seconds", "torch_threads")})
        if prior is not None:
            prior["val"] = prior_val(key)
            prior["label_information"] = label_information(row, key)
        rows.append(
            {"row": key, "tokenizer_row": row, "prior_steps": steps, "tokenizer": tok, "prior": prior,
             "sampling": sample, "score": score}
        )  # fmt: skip
        if score is not None:
            grid(OUT / key / "samples", RESULTS / f"prior_study_{key}.png")
    out = {
        "what": "Fashion-MNIST tokenizers judged by the class-conditional prior trained on their tokens",
        "commands": [
            f"python benchmarks/prior_study.py {s}" for s in ("tokenizers", "judge", "priors", "report")
        ],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), no GPU",
        "sets": {
            "judge_train": JUDGE_TRAIN,
            "fd_reference": REF,
            "reconstructed": EVAL,
            "judge_input": "grey 28x28",
        },
        "judge": judge,
        "baselines": base,
        "prior_recipe": {"config": str(PRIOR_CONFIG.relative_to(ROOT)), "overrides": prior_overrides(args)},
        "sampling": {"per_class": args.per_class, "guidance": args.guidance, "temperature": args.temperature},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prior_study.json").write_text(json.dumps(out, indent=2, default=str))
    print(table(out))
    return 0


def table(res: dict[str, Any]) -> str:
    """The README's tables: one line per tokenizer, then the distance floor of the held-out set."""
    lines = [
        "| row | prior steps | bits / image | T x K | PSNR tokenized (512 held-out) | "
        "prior held-out bits / image, best (uniform) | label use, nats / image (of ln 10 = 2.3) | "
        "class accuracy: samples | FD: samples | FD: tokenizer recon. | class accuracy: tokenizer recon. | "
        "samples / s |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        tok, sc = r["tokenizer"], r["score"]
        if tok is None:
            lines.append(f"| {r['row']} | | (tokenizer not trained yet) | | | | | | | | | |")
            continue
        s = tok["summary"]
        left = f"| {r['row']} | {r['prior_steps']} | {tok['bits_per_image']:,.0f} | "
        left += f"{tok['tokens']} x {tok['codebook_size']} | "
        left += f"{s['psnr_tokenized']:.2f} dB | "
        val = (r.get("prior") or {}).get("val")
        left += f"{val['val_bits']:,.0f} ({tok['bits_per_image']:,.0f}) | " if val else "| "
        li = (r.get("prior") or {}).get("label_information")
        left += f"{li['nats_per_image_null'] - li['nats_per_image_true']:.2f} | " if li else "| "
        if sc is None:
            lines.append(left + "(prior not sampled yet) | | | | |")
            continue
        rate = (r.get("sampling") or {}).get("samples_per_s")
        lines.append(
            left + f"{100 * sc['samples']['class_accuracy']:.1f}% | {sc['samples']['fd']:.1f} | "
            f"{sc['tokenizer']['fd']:.1f} | {100 * sc['tokenizer']['class_accuracy']:.1f}% | "
            + (f"{rate:.1f} |" if rate is not None else "|")
        )
    base = res.get("baselines")
    if base:
        lines += ["", "| held-out set [59500, 60000) as | class accuracy | FD |", "| --- | ---: | ---: |"]
        for k, label in (
            ("real", "real images (28 x 28)"),
            ("resize", "resized to 64 x 64 (the VAE's input)"),
            ("vae", "taef2 encode -> decode"),
        ):
            lines.append(f"| {label} | {100 * base[k]['class_accuracy']:.1f}% | {base[k]['fd']:.1f} |")
    return "\n".join(lines)


def grid(samples: Path, path: Path, per_class: int = 10) -> Path:
    """``per_class`` samples of each class side by side, one row per class (grey PNG)."""
    from PIL import Image

    images, asked = read_samples(samples)
    h, w = images.shape[1:]
    canvas = np.full((10 * h, per_class * w), 255, np.uint8)
    for c in range(10):
        for j, i in enumerate(np.flatnonzero(asked == c)[:per_class]):
            canvas[c * h : (c + 1) * h, j * w : (j + 1) * w] = images[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["tokenizers", "judge", "priors", "report", "all"])
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared")))
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument(
        "--tok-steps", type=int, default=None, help="tokenizer steps (default: the preset's 1,000)"
    )
    p.add_argument("--judge-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the judge")
    p.add_argument(
        "--prior-items", type=int, default=PRIOR_ITEMS, help="the prior trains on training images [0, N)"
    )
    p.add_argument(
        "--prior-steps", type=int, default=PRIOR_STEPS, help="every row's prior: steps of 32 (another value: "
        "a variant beside the study's rows, runs/prior_study/<row>_s<steps>)",
    )  # fmt: skip
    p.add_argument("--prior-set", action="append", default=[], help="more prior overrides (a.b=c), every row")
    p.add_argument(
        "--tokenize", choices=("latents", "cli"), default="latents", help="how the prior's tokens are made"
    )
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    if not 0 < args.prior_items <= JUDGE_TRAIN[1]:
        p.error(f"--prior-items: 1 to {JUDGE_TRAIN[1]} (images from {JUDGE_TRAIN[1]} on are held out)")
    if bad := sorted(set(args.rows) - set(ROWS)):
        p.error(f"--rows: unknown {bad} (rows: {', '.join(ROWS)})")
    if not _idx(args.shared)[0].is_file():
        print(f"error: needs {_idx(args.shared)[0]} (the development assets in ../shared)", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    stages = {
        "tokenizers": stage_tokenizers,
        "judge": stage_judge,
        "priors": stage_priors,
        "report": stage_report,
    }
    for name in stages if args.stage == "all" else [args.stage]:
        if rc := stages[name](args):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
