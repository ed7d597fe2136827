"""Offline image data for the paper's image experiments (arXiv 2602.16601, §5).

Every loader reads local files only; nothing is ever downloaded. A missing file raises
:class:`~collapselab.errors.MissingFileError` naming the exact path and how to obtain it by hand;
a malformed file raises :class:`~collapselab.errors.CollapselabError` with a one-line reason.

All loaders return :class:`ImageData`: float32 images of shape (n, C, H, W) scaled to [-1, 1]
(the range DDPM-style score models are trained on) and int64 labels.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collapselab.errors import CollapselabError, ConfigError, MissingFileError

__all__ = ["DATASETS", "ImageData", "default_root", "load_dataset", "read_idx"]

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 handwritten digits (1797 images, 1 channel, embedded)",
    "fashion-mnist": "Fashion-MNIST 28x28 IDX files (apt-get install dataset-fashion-mnist)",
    "mnist": "MNIST 28x28 IDX files placed by hand in root",
    "cifar10": "CIFAR-10 32x32 RGB binary batches (data_batch_1..5.bin, test_batch.bin)",
    "npy": "a user's .npy image array given as root=path (labels all 0)",
    "npz": "a user's .npz with images under 'x'|'images' and optional labels 'y'|'labels'",
}

# Number of digits images held out as the test split: the last 297 of 1797 leaves 1500 to train.
_DIGITS_TEST = 297

_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
_MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
_MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 bytes per channel (R, G, B)


@dataclass(frozen=True)
class ImageData:
    """A set of images for one split.

    images: float32, shape (n, C, H, W), values in [-1, 1].
    labels: int64, shape (n,); original class ids (a class subset keeps its ids).
    name: the dataset's name (with the split), for reports and cache keys.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (n, C, H, W), got {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels present."""
        return int(np.unique(self.labels).size)


def default_root(name: str) -> Path:
    """Where a dataset's files are looked for when ``root`` is not given.

    Fashion-MNIST: the Debian package's directory. MNIST / CIFAR-10: ``$COLLAPSELAB_DATA/<name>``,
    by default ``~/.local/share/collapselab/datasets/<name>``.
    """
    if name == "fashion-mnist":
        return _FASHION_ROOT
    base = os.environ.get("COLLAPSELAB_DATA")
    base_path = (
        Path(base) if base else Path.home() / ".local" / "share" / "collapselab" / "datasets"
    )
    return base_path / name


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split: str = "train",
    classes: Sequence[int] | None = None,
    downsample: int | None = None,
    limit: int | None = None,
) -> ImageData:
    """Load an image dataset from local files, scaled to [-1, 1].

    name: one of :data:`DATASETS`. root: directory of the files (for "npy"/"npz", the file
    itself). split: "train" or "test" (ignored for "npy"/"npz": the file is the split).
    classes: keep only these labels. downsample: average-pool by this integer factor (28 -> 14
    with 2). limit: keep the first ``limit`` images after the class filter (deterministic).
    """
    if name not in DATASETS:
        raise ConfigError("dataset", f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if name not in ("npy", "npz") and split not in ("train", "test"):
        raise ConfigError("split", f"must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"must be a positive integer, got {limit}")
    if downsample is not None and downsample < 1:
        raise ConfigError("downsample", f"must be a positive integer, got {downsample}")

    if name == "digits":
        raw, labels = _load_digits(split)
    elif name in ("fashion-mnist", "mnist"):
        raw, labels = _load_idx_pair(name, Path(root) if root else default_root(name), split)
    elif name == "cifar10":
        raw, labels = _load_cifar10(Path(root) if root else default_root(name), split)
    else:
        if root is None:
            raise ConfigError("root", f"dataset {name!r} needs root= the path of the array file")
        raw, labels = _load_user_array(Path(root), name)

    # Filter before converting to float: keeps peak memory at the uint8 size for big sets.
    if classes is not None:
        keep = np.isin(labels, np.asarray(list(classes), dtype=np.int64))
        raw, labels = raw[keep], labels[keep]
        if labels.size == 0:
            raise ConfigError("classes", f"no images of classes {list(classes)} in {name}")
    if limit is not None:
        raw, labels = raw[:limit], labels[:limit]

    images = _to_unit_range(raw, name)
    if downsample is not None and downsample > 1:
        images = _avg_pool(images, downsample)
    tag = name if name in ("npy", "npz") else f"{name}:{split}"
    return ImageData(
        images=np.ascontiguousarray(images, dtype=np.float32),
        labels=np.ascontiguousarray(labels, dtype=np.int64),
        name=tag,
    )


# --------------------------------------------------------------------------------------------
# individual loaders: each returns (raw images (n, C, H, W) in their stored dtype, int64 labels)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    # values are integers 0..16; keep them as float32 and scale in _to_unit_range
    x = bunch.images.astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    cut = len(y) - _DIGITS_TEST
    return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])


def _find_idx(root: Path, stem: str, how: str) -> Path:
    # Accept the plain and the gzipped file, and the "train-images.idx3-ubyte" spelling too.
    dotted = stem.replace("-idx", ".idx")
    for cand in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / cand).is_file():
            return root / cand
    raise MissingFileError(str(root / (stem + ".gz")), how)


def _idx_how(name: str, root: Path, stem: str) -> str:
    if name == "fashion-mnist":
        if root == _FASHION_ROOT:
            return "install it with `apt-get install -y dataset-fashion-mnist` (plain file also ok)"
        return (
            f"copy {stem}(.gz) there, e.g. from /usr/share/datasets/fashion-mnist after "
            "`apt-get install -y dataset-fashion-mnist`"
        )
    return (
        f"download {stem}.gz by hand from {_MNIST_URL} (mirror {_MNIST_MIRROR}) into {root} "
        "(collapselab never downloads)"
    )


def _load_idx_pair(name: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lab_stem = _IDX_FILES[split]
    img_path = _find_idx(root, img_stem, _idx_how(name, root, img_stem))
    lab_path = _find_idx(root, lab_stem, _idx_how(name, root, lab_stem))
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3:
        raise CollapselabError(f"{img_path}: expected a 3-d IDX image array, got {images.ndim}-d")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise CollapselabError(
            f"{lab_path}: {labels.shape} labels do not match {images.shape[0]} images"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or .gz) into a native-endian numpy array.

    Format: two zero bytes, a type code, the number of dimensions, then one big-endian uint32
    per dimension, then the data (big-endian).
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise CollapselabError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CollapselabError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CollapselabError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims)) if dims else 1
    if len(data) - header != count * dtype.itemsize:
        raise CollapselabError(
            f"{path}: IDX size mismatch: header says {dims} x {dtype.itemsize} bytes, "
            f"file has {len(data) - header} data bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    # The official archive extracts to cifar-10-batches-bin/; accept the files directly too.
    base = root if (root / files[0]).is_file() else root / "cifar-10-batches-bin"
    chunks = []
    for fname in files:
        path = base / fname
        if not path.is_file():
            raise MissingFileError(
                str(path),
                f"download {_CIFAR_URL} by hand and extract it into {root} "
                "(collapselab never downloads)",
            )
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise CollapselabError(
                f"{path}: not a CIFAR-10 binary batch ({raw.size} bytes is not a multiple of "
                f"{_CIFAR_RECORD})"
            )
        chunks.append(raw.reshape(-1, _CIFAR_RECORD))
    rec = np.concatenate(chunks)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise CollapselabError(f"{base}: CIFAR-10 label byte > 9; not a CIFAR-10 binary batch")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _load_user_array(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MissingFileError(str(path), f"give root= the path of an existing .{kind} file")
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle a user's file
    except (ValueError, OSError) as exc:
        raise CollapselabError(f"{path}: cannot read as .{kind} ({exc})") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = set(loaded.files)
            xkey = next((k for k in ("x", "images") if k in keys), None)
            if xkey is None:
                raise CollapselabError(
                    f"{path}: no image array; expected key 'x' or 'images', found {sorted(keys)}"
                )
            x = loaded[xkey]
            ykey = next((k for k in ("y", "labels") if k in keys), None)
            if ykey is not None:
                labels = loaded[ykey]
    else:
        x = loaded
    x = _to_nchw(np.asarray(x), path)
    if labels is None:
        labels = np.zeros(x.shape[0], dtype=np.int64)
    else:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise CollapselabError(
                f"{path}: labels must be integers of shape ({x.shape[0]},), "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    return x, labels


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        chans = (1, 3, 4)
        # channels-last when the last axis looks like channels and the second does not
        if x.shape[3] in chans and x.shape[1] not in chans:
            return np.transpose(x, (0, 3, 1, 2))
        return x
    raise CollapselabError(
        f"{path}: images must be (n,H,W), (n,C,H,W) or (n,H,W,C), got shape {x.shape}"
    )


def _to_unit_range(x: np.ndarray, name: str) -> np.ndarray:
    """Scale stored pixel values to [-1, 1] (the diffusion models' data range)."""
    if name == "digits":
        return x.astype(np.float32) / 8.0 - 1.0  # digits pixels are 0..16
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise CollapselabError(f"{name}: unsupported image dtype {x.dtype}")
    if x.size == 0:
        return x.astype(np.float32)
    xf = x.astype(np.float64)
    lo, hi = float(np.min(xf)), float(np.max(xf))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CollapselabError(f"{name}: images contain NaN or infinite values")
    # Infer the stored range: [-1, 1] as is, [0, 1] floats, otherwise 0..255 pixel values.
    if lo >= -1.0 and hi <= 1.0 and (lo < 0.0 or np.issubdtype(x.dtype, np.integer)):
        out = xf if lo < 0.0 else xf * 2.0 - 1.0
    elif lo >= 0.0 and hi <= 1.0:
        out = xf * 2.0 - 1.0
    elif lo >= 0.0 and hi <= 255.0:
        out = xf / 127.5 - 1.0
    else:
        raise CollapselabError(
            f"{name}: cannot infer the pixel range from values in [{lo:g}, {hi:g}]; "
            "expected [-1, 1], [0, 1] or [0, 255]"
        )
    return out.astype(np.float32)


def _avg_pool(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    if h % k or w % k:
        raise ConfigError("downsample", f"factor {k} does not divide the image size {h}x{w}")
    return (
        x.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5), dtype=np.float64).astype(np.float32)
    )
