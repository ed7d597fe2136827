"""Image runs end to end through the real loop: digits (embedded) and a tiny synthetic
Fashion-MNIST IDX directory; the missing-file message from the CLI."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment

# A tiny chain: MLP score, few steps, 2 generations, one α and one seed.
TINY = [
    "score.kind=mlp",
    "score.hidden=32",
    "score.layers=2",
    "score.train_steps=20",
    "score.batch_size=64",
    "sampler.steps=10",
    "loop.generations=2",
    "loop.n_train=120",
    "loop.n_samples=60",
    "estimators.n_eval=60",
    "estimators.feature_dim=8",
    "estimators.feature_epochs=4",
    "estimators.extra=[precision_recall]",
    "sweep.alphas=[0.5]",
    "sweep.seeds=[0]",
]


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(root, n_train=150, n_test=60, side=28):
    """Fashion-MNIST-like IDX files (gzipped, as Debian installs them): 3 classes of blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 3).astype(np.uint8)
        centres = np.array([[7, 7], [14, 20], [21, 9]])[labels]
        d2 = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
        imgs = 255 * np.exp(-d2 / 18.0) + rng.normal(0, 8, (n, side, side))
        imgs = np.clip(imgs, 0, 255).astype(np.uint8)
        for stem, arr in (
            (f"{split}-images-idx3-ubyte", imgs),
            (f"{split}-labels-idx1-ubyte", labels),
        ):
            (root / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(arr)))


def _check_run(store, df: pd.DataFrame, shape: tuple[int, ...], n: int) -> None:
    gens = sorted(df.generation.unique())
    assert gens == [0, 1, 2]
    for metric in ("accumulated_chi2", "accumulated_kl"):
        sub = df[(df.metric == metric) & (df.generation > 0)]
        assert len(sub) == 2
        assert set(sub.estimator) == {"gaussian_features"}
        # finite or an explicit inf with its reason; never NaN without a note
        for _, row in sub.iterrows():
            assert np.isfinite(row.value) or "infinite" in str(row.note) or np.isinf(row.value)
        zero = df[(df.metric == metric) & (df.generation == 0)]
        assert zero.value.tolist() == [0.0] and zero.estimator.tolist() == ["exact"]
    for metric in ("intra_chi2", "intra_kl"):
        assert set(df[df.metric == metric].estimator) == {"gaussian_features"}
    for metric in ("precision", "recall"):
        vals = df[df.metric == metric].value
        assert len(vals) == 2 and ((vals >= 0) & (vals <= 1)).all()
    acc = df[df.metric == "feature_test_accuracy"]
    assert len(acc) == 1 and acc.generation.item() == 0 and 0.0 <= acc.value.item() <= 1.0
    for g in (0, 1):
        cell = store.cell(0.5, 0, g)
        samples = np.load(cell / "samples.npy")
        assert samples.shape == (n, *shape) and samples.dtype == np.float32
        assert np.isfinite(samples).all()
        assert (cell / "model.safetensors").stat().st_size > 0
        timings = json.loads((cell / "metrics.json").read_text())["timings"]
        assert set(timings) == {"fit", "sample", "measure"}


def test_digits_end_to_end(tmp_path):
    cfg = load_config("digits", TINY)
    store = prepare_run_dir(cfg, tmp_path / "digits")
    df = run_experiment(cfg, store, workers=1)
    _check_run(store, df, (1, 8, 8), 60)
    acc = df[df.metric == "feature_test_accuracy"].value.item()
    assert acc > 0.2  # a few epochs of the feature MLP beat chance (0.1) on digits


def test_fashion_mnist_idx_end_to_end(tmp_path):
    root = tmp_path / "fashion"
    _write_fashion(root)
    cfg = load_config(
        "fashion-mnist-cpu",
        [*TINY, f"target.root={root}", "device=cpu"],
    )
    assert cfg.target.downsample == 2
    store = prepare_run_dir(cfg, tmp_path / "fashion-run")
    df = run_experiment(cfg, store, workers=1)
    _check_run(store, df, (1, 14, 14), 60)
    # the three blob classes are trivially separable
    assert df[df.metric == "feature_test_accuracy"].value.item() > 0.9


def test_missing_fashion_file_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "COLLAPSELAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "collapselab.cli",
            "run",
            "digits",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
            "--no-report",
            "--set",
            "target.dataset=fashion-mnist",
            "--set",
            "target.root=/nonexistent",
            "--set",
            "score.kind=mlp",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "/nonexistent/train-images-idx3-ubyte" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize("preset", ["digits", "fashion-mnist", "fashion-mnist-cpu", "cifar10"])
def test_image_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.target.kind == "dataset" and cfg.score.kind in ("mlp", "unet")
    assert cfg.sweep.alphas == [0.1, 0.5, 0.9]
    assert cfg.notes.strip()
