"""Offline loaders: tiny synthetic IDX / CIFAR / npy / npz files written into tmp_path."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from collapselab.datasets import DATASETS, ImageData, load_dataset, read_idx
from collapselab.errors import CollapselabError, ConfigError, MissingFileError


def _idx_bytes(arr: np.ndarray) -> bytes:
    # IDX: 0, 0, type code 0x08 (ubyte), ndim, big-endian uint32 dims, data
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_set(root, rng, n=12, side=4, gz=False):
    imgs = {s: rng.integers(0, 256, (n, side, side), dtype=np.uint8) for s in ("train", "t10k")}
    labs = {s: (np.arange(n) % 3).astype(np.uint8) for s in ("train", "t10k")}
    root.mkdir(parents=True, exist_ok=True)
    for s in ("train", "t10k"):
        for stem, arr in ((f"{s}-images-idx3-ubyte", imgs[s]), (f"{s}-labels-idx1-ubyte", labs[s])):
            data = _idx_bytes(arr)
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
    return imgs, labs


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_loader_plain_and_gz(tmp_path, name, gz):
    rng = np.random.default_rng(0)
    imgs, labs = _write_idx_set(tmp_path, rng, gz=gz)
    for split, key in (("train", "train"), ("test", "t10k")):
        d = load_dataset(name, root=tmp_path, split=split)
        assert isinstance(d, ImageData)
        assert d.images.dtype == np.float32 and d.labels.dtype == np.int64
        assert d.images.shape == (12, 1, 4, 4) and d.shape == (1, 4, 4)
        # uint8 p -> p / 127.5 - 1 exactly representable up to float32 rounding
        np.testing.assert_allclose(d.images[:, 0], imgs[key] / 127.5 - 1.0, atol=1e-6)
        np.testing.assert_array_equal(d.labels, labs[key])
        assert d.num_classes == 3


def test_read_idx_other_dtype_and_bad_magic(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    p = tmp_path / "x-idx2-int"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    np.testing.assert_array_equal(read_idx(p), np.arange(6).reshape(2, 3))
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 20)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(1, np.uint8)))
    with pytest.raises(CollapselabError, match="bad magic") as exc:
        load_dataset("mnist", root=tmp_path)
    assert "\n" not in str(exc.value)
    truncated = tmp_path / "short-idx1"
    truncated.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(CollapselabError, match="size mismatch"):
        read_idx(truncated)


def test_missing_files_name_path_and_remedy(tmp_path):
    with pytest.raises(MissingFileError) as exc:
        load_dataset("fashion-mnist", root=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "\n" not in msg
    with pytest.raises(MissingFileError) as exc:
        load_dataset("mnist", root=tmp_path, split="test")
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(exc.value)
    assert "yann.lecun.com/exdb/mnist" in str(exc.value)
    with pytest.raises(MissingFileError) as exc:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_1.bin" in str(exc.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in str(exc.value)
    with pytest.raises(MissingFileError, match="nothere.npy"):
        load_dataset("npy", root=tmp_path / "nothere.npy")


def _write_cifar(path, rng, n):
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    pix = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rec = np.concatenate([labels[:, None], pix.reshape(n, -1)], axis=1)
    path.write_bytes(rec.tobytes())
    return pix, labels


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-bin"])
def test_cifar10_binary(tmp_path, sub):
    rng = np.random.default_rng(1)
    base = tmp_path / sub if sub else tmp_path
    base.mkdir(exist_ok=True)
    parts = [_write_cifar(base / f"data_batch_{i}.bin", rng, 3) for i in range(1, 6)]
    test_pix, test_lab = _write_cifar(base / "test_batch.bin", rng, 4)
    d = load_dataset("cifar10", root=tmp_path)
    assert d.images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(d.labels, np.concatenate([p[1] for p in parts]))
    np.testing.assert_allclose(
        d.images, np.concatenate([p[0] for p in parts]) / 127.5 - 1.0, atol=1e-6
    )
    t = load_dataset("cifar10", root=tmp_path, split="test", downsample=2)
    assert t.images.shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(t.labels, test_lab)
    # downsampling is exact 2x2 average pooling
    expected = (test_pix / 127.5 - 1.0).reshape(4, 3, 16, 2, 16, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(t.images, expected, atol=1e-6)


def test_cifar10_malformed(tmp_path):
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(CollapselabError, match="not a CIFAR-10 binary batch"):
        load_dataset("cifar10", root=tmp_path)


def test_npy_layouts_and_ranges(tmp_path):
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", u8)
    d = load_dataset("npy", root=tmp_path / "a.npy")
    assert d.images.shape == (5, 1, 6, 6) and np.all(d.labels == 0)
    np.testing.assert_allclose(d.images[:, 0], u8 / 127.5 - 1.0, atol=1e-6)
    # channels-last floats in [0, 1]
    f01 = rng.random((5, 6, 6, 3))
    np.save(tmp_path / "b.npy", f01)
    d = load_dataset("npy", root=tmp_path / "b.npy")
    assert d.images.shape == (5, 3, 6, 6)
    np.testing.assert_allclose(d.images, np.transpose(f01, (0, 3, 1, 2)) * 2 - 1, atol=1e-6)
    # channels-first floats already in [-1, 1] are kept as is
    fm1 = rng.uniform(-1, 1, (5, 1, 6, 6))
    np.save(tmp_path / "c.npy", fm1)
    np.testing.assert_allclose(load_dataset("npy", root=tmp_path / "c.npy").images, fm1, atol=1e-6)
    np.save(tmp_path / "d.npy", rng.uniform(-5, 5, (2, 4, 4)))
    with pytest.raises(CollapselabError, match="pixel range"):
        load_dataset("npy", root=tmp_path / "d.npy")


def test_npz_keys_labels_and_no_pickle(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (8, 4, 4), dtype=np.uint8)
    y = np.arange(8) % 4
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    d = load_dataset("npz", root=tmp_path / "a.npz", classes=[1, 3])
    np.testing.assert_array_equal(d.labels, [1, 3, 1, 3])
    np.testing.assert_allclose(d.images[:, 0], x[y % 2 == 1] / 127.5 - 1.0, atol=1e-6)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    assert len(load_dataset("npz", root=tmp_path / "b.npz", limit=3)) == 3
    np.savez(tmp_path / "c.npz", foo=x)
    with pytest.raises(CollapselabError, match="'x' or 'images'"):
        load_dataset("npz", root=tmp_path / "c.npz")
    # object arrays would need pickle: refused
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CollapselabError, match="cannot read"):
        load_dataset("npy", root=tmp_path / "obj.npy")


def test_digits_shape_range_split_and_options():
    tr = load_dataset("digits")
    te = load_dataset("digits", split="test")
    assert tr.images.shape == (1500, 1, 8, 8) and te.images.shape == (297, 1, 8, 8)
    assert tr.images.min() == -1.0 and tr.images.max() == 1.0
    assert tr.num_classes == 10 and tr.name == "digits:train"
    # pixel values are 0..16 -> multiples of 1/8 in [-1, 1]
    np.testing.assert_array_equal(tr.images * 8, np.round(tr.images * 8))
    sub = load_dataset("digits", classes=[0, 7], limit=50, downsample=2)
    assert sub.images.shape == (50, 1, 4, 4) and set(sub.labels.tolist()) <= {0, 7}
    full = load_dataset("digits", classes=[0, 7])
    np.testing.assert_allclose(
        sub.images, full.images[:50].reshape(50, 1, 4, 2, 4, 2).mean(axis=(3, 5)), atol=1e-6
    )


def test_config_errors():
    assert set(DATASETS) >= {"digits", "fashion-mnist", "mnist", "cifar10", "npy", "npz"}
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ConfigError, match="downsample"):
        load_dataset("digits", downsample=3)
    with pytest.raises(ConfigError, match="classes"):
        load_dataset("digits", classes=[42])


def test_build_target_loads_once_per_process_and_rereads_a_replaced_file(tmp_path):
    """The CLI's check and every chain of an in-process run share one load; a file written
    again (new modification time) is read again."""
    import os

    from collapselab.config import load_config
    from collapselab.engine.loop import build_target

    path = tmp_path / "imgs.npy"
    np.save(path, np.zeros((6, 1, 4, 4), dtype=np.uint8))
    cfg = load_config("digits", ["target.dataset=npy", f"target.root={path}",
                                 "target.limit=null", "target.classes=null"])
    first = build_target(cfg)
    assert build_target(cfg) is first and first.train.images.shape == (6, 1, 4, 4)
    np.save(path, np.full((5, 1, 4, 4), 255, dtype=np.uint8))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = build_target(cfg)
    assert again is not first and again.train.images.shape == (5, 1, 4, 4)
