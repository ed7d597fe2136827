"""Feature networks for the paper's image divergence (arXiv 2602.16601, §5 "Image divergence").

The paper measures image-model divergences as a Gaussian χ² in "the feature space of a
classifier". No pretrained network is ever downloaded: :class:`FeatureExtractor` trains a small
classifier in-project on the dataset's real training split (a CNN for images of side ≥ 16, an MLP
for tiny ones such as the 8×8 digits), records its test accuracy, and uses the penultimate layer
(the input of the final linear classifier) as the feature map.

Training is seeded and deterministic for a fixed seed on a given machine. Results are cached by
content hash (sha256 of the training images' bytes, labels, architecture, hyper-parameters and
seed) as ``<hash>.safetensors`` (weights, loaded with safetensors, never pickle) plus a
``<hash>.json`` sidecar (test accuracy, feature dimension, hash) written last, atomically, so a
half-written cache entry is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from collapselab.datasets import ImageData

__all__ = ["FeatureExtractor", "FeatureNetConfig", "default_cache_dir"]

_FORMAT = "collapselab-features-v1"  # bump when the network or training code changes


def default_cache_dir() -> Path:
    """``$COLLAPSELAB_CACHE`` or ``~/.cache/collapselab``."""
    env = os.environ.get("COLLAPSELAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "collapselab"


@dataclass(frozen=True)
class FeatureNetConfig:
    """Everything that determines the trained weights besides the data (part of the hash)."""

    arch: str  # "cnn" or "mlp"
    in_shape: tuple[int, int, int]
    num_classes: int
    feature_dim: int
    width: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int


class _FeatureNet(nn.Module):
    """trunk: image -> feature vector (GELU output); head: linear classifier on the features."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        c, h, w = cfg.in_shape
        if cfg.arch == "cnn":
            wd = cfg.width
            self.trunk = nn.Sequential(
                nn.Conv2d(c, wd, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(wd, 2 * wd, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(2 * wd, 2 * wd, 3, padding=1),
                nn.GELU(),
                nn.AdaptiveAvgPool2d(2),  # any input size -> 2x2, so 28x28, 32x32, 14x14 all fit
                nn.Flatten(),
                nn.Linear(8 * wd, cfg.feature_dim),
                nn.GELU(),
            )
        elif cfg.arch == "mlp":
            self.trunk = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c * h * w, cfg.width),
                nn.GELU(),
                nn.Linear(cfg.width, cfg.feature_dim),
                nn.GELU(),
            )
        else:
            raise ValueError(f"unknown arch {cfg.arch!r}")
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _content_hash(train: ImageData, cfg: FeatureNetConfig, device_type: str = "cpu") -> str:
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    if device_type != "cpu":
        # Trained elsewhere, the weights round differently: a separate entry. (CPU entries
        # keep the hash they had before the device became part of the key.)
        h.update(f"device={device_type}".encode())
    images = np.ascontiguousarray(train.images, dtype=np.float32)
    h.update(str(images.shape).encode())
    h.update(images.tobytes())
    h.update(np.ascontiguousarray(train.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same directory, then os.replace (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureExtractor:
    """A trained classifier whose penultimate layer is the feature space of the paper's image
    divergence proxy (the Gaussian χ² of
    :func:`collapselab.measure.feature_metrics.feature_gaussian_chi2`).

    Build it with :meth:`fit_or_load`. Attributes: ``test_accuracy`` (nan when no test split was
    given), ``content_hash``, ``feature_dim``, ``config``.
    """

    def __init__(
        self,
        model: _FeatureNet,
        config: FeatureNetConfig,
        content_hash: str,
        test_accuracy: float,
        device: str = "cpu",
    ):
        self.model = model.to(device).eval()
        self.config = config
        self.content_hash = content_hash
        self.test_accuracy = float(test_accuracy)
        self.device = device

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @classmethod
    def fit_or_load(
        cls,
        train: ImageData,
        test: ImageData | None = None,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        epochs: int | None = None,
        feature_dim: int = 64,
        arch: str | None = None,
        width: int | None = None,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        device: str = "cpu",
    ) -> FeatureExtractor:
        """Train the feature classifier on ``train`` (or load it from the cache) and return it.

        epochs: None picks about 600 optimiser steps, between 2 and 25 epochs. arch: None picks
        "cnn" when both image sides are ≥ 16, else "mlp". width: channels of the first conv
        (default 16) or hidden units of the MLP (default 128). ``test`` only sets
        ``test_accuracy``; it is not part of the hash. cache_dir: default
        :func:`default_cache_dir`; entries live in ``<cache_dir>/features``.
        """
        if len(train) == 0:
            raise ValueError("empty training set")
        c, h, w = train.shape
        arch = arch or ("cnn" if min(h, w) >= 16 else "mlp")
        width = width or (16 if arch == "cnn" else 128)
        if epochs is None:
            steps_per_epoch = math.ceil(len(train) / batch_size)
            epochs = int(min(25, max(2, math.ceil(600 / steps_per_epoch))))
        cfg = FeatureNetConfig(
            arch=arch,
            in_shape=(c, h, w),
            num_classes=int(train.labels.max()) + 1,
            feature_dim=int(feature_dim),
            width=int(width),
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            weight_decay=float(weight_decay),
            seed=int(seed),
        )
        digest = _content_hash(train, cfg, torch.device(device).type)
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = folder / "features"
        folder.mkdir(parents=True, exist_ok=True)
        weights_path, meta_path = folder / f"{digest}.safetensors", folder / f"{digest}.json"

        meta = _read_meta(meta_path, digest)
        dirty = False  # whether the sidecar must be (re)written
        model = None
        if meta is not None and weights_path.is_file():
            with torch.random.fork_rng(devices=[]):  # do not consume the caller's RNG
                model = _FeatureNet(cfg)
            try:
                model.load_state_dict(load_file(str(weights_path)), strict=True)
            except Exception:  # a corrupt or foreign weights file: retrain and overwrite it
                model = None
        if model is None:
            t0 = time.perf_counter()
            model = _train(cfg, train, device)
            meta = {
                "format": _FORMAT,
                "content_hash": digest,
                "dataset": train.name,
                "n_train": len(train),
                "config": asdict(cfg),
                "feature_dim": cfg.feature_dim,
                "train_seconds": round(time.perf_counter() - t0, 3),
                "test_accuracy": None,
                "test_hash": None,
            }
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            _atomic_write(weights_path, lambda p: save_file(state, p))
            dirty = True
        ext = cls(model, cfg, digest, math.nan, device)
        if test is not None and len(test) > 0:
            test_hash = hashlib.sha256(
                np.ascontiguousarray(test.images, dtype=np.float32).tobytes()
                + np.ascontiguousarray(test.labels, dtype=np.int64).tobytes()
            ).hexdigest()
            if meta.get("test_hash") != test_hash or meta.get("test_accuracy") is None:
                meta.update(
                    test_accuracy=ext._accuracy(test),
                    test_hash=test_hash,
                    test_dataset=test.name,
                    n_test=len(test),
                )
                dirty = True
        if meta.get("test_accuracy") is not None:
            ext.test_accuracy = float(meta["test_accuracy"])
        if dirty:
            # The sidecar is written after the weights: its presence marks a complete entry.
            text = json.dumps(meta, indent=2, sort_keys=True)
            _atomic_write(meta_path, lambda p: Path(p).write_text(text))
        return ext

    def _logits(self, images: np.ndarray, batch: int) -> np.ndarray:
        return self._apply(self.model, images, batch)

    def _apply(self, fn: nn.Module, images: np.ndarray, batch: int) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.config.in_shape):
            raise ValueError(
                f"images must have shape (n, {', '.join(map(str, self.config.in_shape))}), "
                f"got {images.shape}"
            )
        self.model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(images[i : i + batch]).to(self.device)
                out.append(fn(x).double().cpu().numpy())
        if not out:
            return np.zeros((0, 0))
        return np.concatenate(out)

    def features(self, images: np.ndarray | ImageData, batch_size: int = 512) -> np.ndarray:
        """Feature vectors (n, feature_dim), float64, of images (n, C, H, W) in [-1, 1]."""
        if isinstance(images, ImageData):
            images = images.images
        feats = self._apply(self.model.trunk, images, batch_size)
        return feats.reshape(len(feats), self.feature_dim)

    def predict(self, images: np.ndarray | ImageData, batch_size: int = 512) -> np.ndarray:
        """Predicted class ids (n,)."""
        if isinstance(images, ImageData):
            images = images.images
        return self._logits(images, batch_size).argmax(axis=1).astype(np.int64)

    def _accuracy(self, data: ImageData) -> float:
        return float(np.mean(self.predict(data) == data.labels))


def _read_meta(path: Path, digest: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("content_hash") != digest or meta.get("format") != _FORMAT:
        return None
    return meta


def _train(cfg: FeatureNetConfig, data: ImageData, device: str) -> _FeatureNet:
    """Cross-entropy training with AdamW and a cosine learning-rate decay, fully seeded."""
    # Weight init draws from torch's global RNG: fork it so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _FeatureNet(cfg)
    model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling: its own explicit stream
    x = torch.from_numpy(np.ascontiguousarray(data.images, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(data.labels, dtype=np.int64))
    n = len(y)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
