"""In-project feature classifier: accuracy, determinism, content-hash cache, safe loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collapselab.datasets import ImageData, load_dataset
from collapselab.measure.features import FeatureExtractor


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits"), load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def fitted(digits, tmp_path_factory):
    train, test = digits
    cache = tmp_path_factory.mktemp("cache")
    return FeatureExtractor.fit_or_load(train, test, seed=0, cache_dir=cache), cache


def test_digits_accuracy_and_feature_shape(fitted, digits):
    fe, _ = fitted
    _, test = digits
    # a small MLP on 8x8 digits: held-out accuracy well above 90%
    assert fe.config.arch == "mlp" and fe.test_accuracy > 0.9
    feats = fe.features(test.images)
    assert feats.shape == (len(test), 64) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and np.linalg.matrix_rank(feats) > 32
    # batching changes only float32 round-off (BLAS kernels differ by batch size)
    np.testing.assert_allclose(feats, fe.features(test, batch_size=7), rtol=1e-5, atol=1e-5)


def test_same_seed_identical_features_and_cache_hit(fitted, digits, tmp_path):
    fe, cache = fitted
    train, test = digits
    files = sorted(p.name for p in (cache / "features").iterdir())
    assert files == [f"{fe.content_hash}.json", f"{fe.content_hash}.safetensors"]
    meta = json.loads((cache / "features" / f"{fe.content_hash}.json").read_text())
    assert meta["test_accuracy"] == pytest.approx(fe.test_accuracy)
    assert meta["feature_dim"] == 64 and meta["content_hash"] == fe.content_hash
    # a second fit with the same seed in a fresh cache: bit-identical features
    fresh = FeatureExtractor.fit_or_load(train, test, seed=0, cache_dir=tmp_path)
    assert fresh.content_hash == fe.content_hash
    np.testing.assert_array_equal(fresh.features(test), fe.features(test))
    # loading from the cache gives the same network
    loaded = FeatureExtractor.fit_or_load(train, None, seed=0, cache_dir=cache)
    np.testing.assert_array_equal(loaded.features(test), fe.features(test))
    assert loaded.test_accuracy == pytest.approx(fe.test_accuracy)


def test_hash_depends_on_data_seed_and_hyperparameters(fitted, digits, tmp_path):
    fe, _ = fitted
    train, _ = digits
    small = ImageData(train.images[:200], train.labels[:200], train.name)
    kw = {"cache_dir": tmp_path, "epochs": 1}
    h = FeatureExtractor.fit_or_load(small, seed=0, **kw).content_hash
    assert h != fe.content_hash
    assert FeatureExtractor.fit_or_load(small, seed=1, **kw).content_hash != h
    assert FeatureExtractor.fit_or_load(small, seed=0, feature_dim=16, **kw).content_hash != h
    other = ImageData(train.images[200:400], train.labels[:200], train.name)
    assert FeatureExtractor.fit_or_load(other, seed=0, **kw).content_hash != h


def test_corrupt_cache_entry_is_retrained(digits, tmp_path):
    train, _ = digits
    small = ImageData(train.images[:200], train.labels[:200], train.name)
    fe = FeatureExtractor.fit_or_load(small, seed=0, cache_dir=tmp_path, epochs=1)
    weights = tmp_path / "features" / f"{fe.content_hash}.safetensors"
    weights.write_bytes(b"not a safetensors file")
    again = FeatureExtractor.fit_or_load(small, seed=0, cache_dir=tmp_path, epochs=1)
    np.testing.assert_array_equal(again.features(small), fe.features(small))
    assert not list((tmp_path / "features").glob("*.tmp"))


def test_cnn_on_small_images_and_shape_check(tmp_path):
    rng = np.random.default_rng(0)
    # two classes separable by mean brightness; a 1-epoch CNN must learn it
    labels = np.arange(256) % 2
    x = rng.uniform(-1, 0, (256, 1, 16, 16)) + labels[:, None, None, None] * 0.8
    data = ImageData(x.astype(np.float32), labels.astype(np.int64), "toy")
    fe = FeatureExtractor.fit_or_load(
        data, data, cache_dir=tmp_path, epochs=3, feature_dim=8, batch_size=32
    )
    assert fe.config.arch == "cnn" and fe.features(data).shape == (256, 8)
    assert fe.test_accuracy > 0.9
    with pytest.raises(ValueError, match="shape"):
        fe.features(np.zeros((2, 1, 8, 8), np.float32))


def test_hash_separates_devices_but_keeps_cpu_entries(fitted, digits):
    """A classifier trained on an accelerator rounds differently: its own cache entry. CPU
    entries keep the hash they had before the device was part of the key."""
    from collapselab.measure.features import _content_hash

    fe, _ = fitted
    train, _ = digits
    cpu = _content_hash(train, fe.config, "cpu")
    assert cpu == _content_hash(train, fe.config) == fe.content_hash
    assert _content_hash(train, fe.config, "cuda") not in (cpu, _content_hash(train, fe.config,
                                                                               "mps"))
