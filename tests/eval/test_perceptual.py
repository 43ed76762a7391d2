"""rFID, LPIPS and PESQ (revq_ray.eval.perceptual) and their wiring into ``python -m revq_ray.eval``.

Offline: the pretrained weights are replaced by randomly initialized ones that the tests build and save
under the standard file names, so the real loading plumbing runs (``--metric-weights DIR``); downloads are
only ever tried against a server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revq_ray.eval import perceptual as P

SHARED = Path(os.environ.get("REVQ_SHARED", Path(__file__).resolve().parents[3] / "shared"))


def _images(tiny_assets, n: int) -> torch.Tensor:
    """``n`` real photo crops (B, 3, 16, 16) in [0, 1]."""
    return torch.from_numpy(tiny_assets["images"][:n]).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """Randomly initialized FID Inception-v3 and AlexNet weights under their standard names."""
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("metric_weights")
    torch.save({}, root / "empty.pth")
    # The extractor always loads a state dict in __init__: build it non-strictly from an empty one.
    with pytest.MonkeyPatch.context() as mp:
        lenient = functools.partialmethod(torch.nn.Module.load_state_dict, strict=False)
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lenient)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(root / "empty.pth"))
    for m in net.modules():  # variance-preserving init: default init shrinks features to ~1e-8
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), root / P.INCEPTION.name)
    torch.save(torchvision.models.alexnet().state_dict(), root / P.ALEXNET.name)
    return root


@pytest.mark.core
def test_frechet_distance_self_zero_grows_with_shift_and_matches_torch_fidelity(tiny_assets):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
    ).eval()
    x = _images(tiny_assets, 64)
    f = P.extract_features(net, x, batch_size=16)
    assert f.shape == (64, 16) and f.dtype == torch.float64
    assert abs(P.frechet_distance(f, f)) < 1e-9
    fids = [P.frechet_distance(f, P.extract_features(net, (x + s).clamp(0, 1))) for s in (0.05, 0.1, 0.2)]
    assert 1e-4 < fids[0] < fids[1] < fids[2], fids
    gray = P.extract_features(net, x.mean(1, keepdim=True))  # (B, 1, H, W) -> 3 channels
    assert gray.shape == (64, 16)
    # the nuclear-norm forms equal torch-fidelity's eigenvalue form (more and fewer items than features)
    for a, b in ((f, f[:40] * 1.1 + 0.01), (f[:9], f[20:30] + 0.02)):
        ref = fid_statistics_to_metric(
            fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False
        )["frechet_inception_distance"]
        for method in ("gram", "feature"):
            assert P.frechet_distance(a, b, method) == pytest.approx(ref, rel=1e-6)


@pytest.mark.core
def test_inception_from_a_weights_dir(weights_dir, tiny_assets, tmp_path):
    path, note = P.locate_weights(P.INCEPTION, weights_dir, download=False)
    assert path == weights_dir / P.INCEPTION.name and note == ""
    net = P.InceptionPool(path)
    x = _images(tiny_assets, 6)
    f = P.extract_features(net, x, batch_size=3)
    assert f.shape == (6, 2048) and torch.isfinite(f).all() and f.std() > 1e-3
    assert abs(P.frechet_distance(f, f)) < 1e-6 < P.frechet_distance(f, P.extract_features(net, x * 0.5))
    # a weights file holding pickled objects besides tensors is refused before torch-fidelity loads it
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": torch.zeros(1), "where": Path("x")}, bad / P.INCEPTION.name)
    with pytest.raises(ValueError, match=P.INCEPTION.name):
        P.InceptionPool(bad / P.INCEPTION.name)
    pm = P.Perceptual(weights_dir=bad, download=False)
    pm.load_image_nets()
    assert pm.fid_net is None and any("could not be loaded" in n for n in pm.notes)


@pytest.mark.core
def test_lpips_zero_for_identical_and_grows_with_noise(weights_dir, tiny_assets):
    x = _images(tiny_assets, 8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    sd = torch.load(weights_dir / P.ALEXNET.name, weights_only=True)
    for net in (P.build_lpips(weights_dir / P.ALEXNET.name), P.build_lpips(None)):
        assert P.lpips_per_image(net, x, x).abs().max() < 1e-7
        d = [P.lpips_per_image(net, x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.05, 0.1, 0.2)]
        assert 0 < d[0] < d[1] < d[2], d
    loaded = P.build_lpips(weights_dir / P.ALEXNET.name).net
    assert torch.equal(
        loaded.state_dict()["slice5.10.weight"], sd["features.10.weight"]
    )  # the trunk really came from disk
    with pytest.raises(ValueError, match="not a torchvision AlexNet"):
        P.build_lpips(weights_dir / P.INCEPTION.name)


def _speech() -> tuple[torch.Tensor, int]:
    """Real speech from ../shared when present, else a synthetic voiced signal (gliding pitch, harmonics)."""
    import soundfile as sf

    path = SHARED / "data" / "speech16k" / "vm-instructions.flac"
    if path.is_file():
        wave, sr = sf.read(str(path), dtype="float32")
        return torch.from_numpy(wave), sr
    sr = 16000
    t = np.arange(2 * sr) / sr
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / sr
    wave = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.2 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return torch.from_numpy(wave * (np.sin(2 * np.pi * 0.5 * t) > -0.5)).float(), sr


@pytest.mark.core
def test_pesq_identical_high_noisy_lower_unscorable_counted():
    import torchaudio

    wave, sr = _speech()
    g = torch.Generator().manual_seed(0)
    noisy = [wave + 10 ** (-snr / 20) * wave.std() * torch.randn(wave.shape, generator=g) for snr in (40, 20)]
    same = P.pesq_clip(wave, wave, sr)
    scores = [P.pesq_clip(wave, n, sr) for n in noisy]
    assert same >= 4.0 and same > scores[0] > scores[1], (same, scores)
    w8 = torchaudio.functional.resample(wave, sr, 8000)  # other rates are resampled to 16 kHz
    assert P.pesq_clip(w8, w8, 8000) >= 4.0 and P.pesq_clip(w8, w8, 8000, mode="nb") >= 4.0
    pm = P.Perceptual()
    mean = pm.pesq([wave, wave[:200]], [noisy[0], wave[:200]], sr)  # the 200-sample clip cannot be scored
    assert mean == pytest.approx(scores[0]) and (pm.pesq_failed, pm.pesq_scored) == (1, 2)
    assert "1 of 2 clips" in pm.pesq_note()
    with pytest.raises(ValueError, match="PESQ mode"):
        P.pesq_clip(wave, wave, sr, mode="xx")
    with pytest.raises(ValueError, match="pesq_mode"):
        P.Perceptual(pesq_mode="xx")  # refused before any eval work, not per clip


@pytest.mark.core
def test_missing_weights_are_noted_not_fetched(tmp_path, monkeypatch):
    assert os.environ.get("REVQ_OFFLINE") == "1"  # tests/conftest.py: downloads are off in every test
    pm = P.Perceptual(weights_dir=tmp_path, download=True)
    pm.load_image_nets()
    assert pm.fid_net is None and pm.lpips_net is None and len(pm.notes) == 2
    for wf, note in zip((P.INCEPTION, P.ALEXNET), pm.notes):
        assert wf.name in note and str(tmp_path) in note and "--metric-weights" in note
        assert "REVQ_OFFLINE=1" in note and str(P.hub_checkpoints()) in note
    monkeypatch.delenv("REVQ_OFFLINE")
    _, note = P.locate_weights(P.INCEPTION, tmp_path, download=False)
    assert "--no-download" in note
    # Allowed but failing (nothing listens on 127.0.0.1:9): gives up at once, noted, no crash.
    wf = P.WeightsFile("x-deadbeef.pth", "http://127.0.0.1:9/x-deadbeef.pth", "test metric")
    t0 = time.perf_counter()
    path, note = P.locate_weights(wf, tmp_path, download=True, timeout_s=2)
    assert path is None and "download from http://127.0.0.1:9/" in note and time.perf_counter() - t0 < 10


@pytest.mark.core
def test_download_checks_the_hash_and_writes_atomically(tmp_path):
    payload = os.urandom(3000)
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "blob").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/blob"
    try:
        good = P.WeightsFile(f"w-{prefix}.pth", url, "test")
        assert P.download_weights(good, tmp_path / "out" / good.name).read_bytes() == payload
        bad = P.WeightsFile("w-00000000.pth", url, "test")
        with pytest.raises(ValueError, match="sha256"):
            P.download_weights(bad, tmp_path / "out" / bad.name)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [good.name]  # no partial file left
    finally:
        server.shutdown()


@pytest.mark.eval
def test_eval_reports_rfid_and_lpips(tiny_assets, weights_dir, tmp_path, capsys):
    from revq_ray.eval.evaluate import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i, a in enumerate(tiny_assets["images"][:8]):
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")
    args = [
        "--model",
        str(tiny_assets["model_dir"]),
        "--input",
        str(folder),
        "--vae",
        tiny_assets["vae_spec"],
    ]
    out = tmp_path / "eval"
    assert main([*args, "--output", str(out), "--device", "cpu", "--metric-weights", str(weights_dir)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    s, img = m["summary"], m["image"]
    for key in ("rfid_vae_only", "rfid_tokenized", "lpips_vae_only", "lpips_tokenized"):
        assert math.isfinite(s[key]) and s[key] > 0, key
    assert s["rfid_tokenized"] == img["tokenized"]["rfid"] and s["lpips_vae_only"] == img["vae_only"]["lpips"]
    assert "lpips" in img["tokenized_without_rectifier"] and "rfid" not in img["tokenized_without_rectifier"]
    assert img["perceptual"]["images"] == 8 and img["perceptual"]["rfid_features"] == 2048
    assert img["perceptual"]["rfid_weights"] == str(weights_dir / P.INCEPTION.name)
    assert any("rFID over 8 images" in n for n in m["notes"])
    assert (
        "| rfid_tokenized |" in (out / "report.md").read_text()
        and "lpips_tokenized" in capsys.readouterr().out
    )

    off = tmp_path / "off"  # --no-perceptual: nothing loaded, said so
    assert main([*args, "--output", str(off), "--no-perceptual", "--limit", "4"]) == 0
    m = json.loads((off / "metrics.json").read_text())
    assert not any(k.startswith(("rfid", "lpips")) for k in m["summary"])
    assert any("--no-perceptual" in n for n in m["notes"])


@pytest.mark.eval
def test_eval_latent_shards_rfid_against_vae_only(tiny_assets, weights_dir, tmp_path):
    from revq_ray.data.shards import ShardWriter
    from revq_ray.eval.evaluate import evaluate

    shards = tmp_path / "shards"
    z = tiny_assets["latents"].numpy()[:4]
    with ShardWriter(shards, shard_size=16) as w:
        w.write_batch([f"{i:04d}" for i in range(len(z))], z)
    w.manifest(vae=tiny_assets["vae_spec"], modality="image").save(shards)
    m = evaluate(
        tiny_assets["model_dir"], shards, tmp_path / "eval", metric_weights=weights_dir, log=lambda s: None
    )
    s = m["summary"]
    assert s["rfid_tokenized_vs_vae_only"] > 0 and s["lpips_tokenized_vs_vae_only"] > 0
    assert "rfid_tokenized" not in s and "rfid_vae_only" not in s and "vae_only" not in m["image"]
