"""score.train_backend: "torch" by default (or $COLLAPSELAB_TRAIN_BACKEND), validated; a
default run never loads the optional accelerator, so its numbers cannot depend on it."""

import os
import subprocess
import sys

import pytest

from collapselab.config import TRAIN_BACKEND_ENV, load_config
from collapselab.errors import ConfigError


def test_default_is_torch_and_the_environment_can_switch(monkeypatch):
    monkeypatch.delenv(TRAIN_BACKEND_ENV, raising=False)
    assert load_config("quickstart").score.train_backend == "torch"
    monkeypatch.setenv(TRAIN_BACKEND_ENV, "torch")
    assert load_config("quickstart").score.train_backend == "torch"


def test_bad_values_name_the_field_and_the_allowed_values(monkeypatch):
    monkeypatch.delenv(TRAIN_BACKEND_ENV, raising=False)
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["score.train_backend=fast"])
    assert err.value.field == "score.train_backend" and "'torch'" in str(err.value)
    monkeypatch.setenv(TRAIN_BACKEND_ENV, "gpu")
    with pytest.raises(ConfigError) as err:
        load_config("quickstart")
    assert "train_backend" in err.value.field and TRAIN_BACKEND_ENV in str(err.value)


def test_native_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.delenv(TRAIN_BACKEND_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "collapselab.fast", None)  # unimportable
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["score.train_backend=native"])
    assert err.value.field == "score.train_backend" and "collapselab.fast" in str(err.value)


def test_a_default_mlp_run_never_imports_the_accelerator(tmp_path):
    """In a fresh interpreter: a small MLP run (local and batched executors) leaves
    collapselab.fast unimported; with the package made unimportable it gives the same bytes."""
    code = """
import sys
block = sys.argv[1] == "block"
if block:
    sys.modules["collapselab.fast"] = None
from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
sets = ["score.kind=mlp", "score.hidden=16", "score.layers=2", "score.train_steps=10",
        "score.batch_size=64", "loop.generations=1", "loop.n_train=200", "sampler.steps=10",
        "estimators.n_mc=200", "estimators.n_eval=100", "pathwise.n_mc=20",
        "pathwise.n_paths=20", "pathwise.n_times=3", "pathwise.steps=10",
        "sweep.alphas=[0.5]", "sweep.seeds=[0, 1]"]
cfg = load_config("quickstart", sets)
for ex in ("local", "batched"):
    store = prepare_run_dir(cfg, __import__("pathlib").Path(sys.argv[2]) / ex)
    run_experiment(cfg, store, executor=ex, workers=1)
assert "collapselab.fast" not in sys.modules or block, "the default run imported collapselab.fast"
"""
    env_cmd = [sys.executable, "-c", code]
    for mode in ("free", "block"):
        env = {**os.environ, TRAIN_BACKEND_ENV: "", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([*env_cmd, mode, str(tmp_path / mode)], capture_output=True,
                           text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    for ex in ("local", "batched"):
        a = (tmp_path / "free" / ex / "results.parquet").read_bytes()
        b = (tmp_path / "block" / ex / "results.parquet").read_bytes()
        assert a == b


def test_the_hint_names_the_accelerator_only_where_it_helps(monkeypatch):
    import importlib.util

    from collapselab.cli import speed_hint

    monkeypatch.delenv(TRAIN_BACKEND_ENV, raising=False)
    installed = importlib.util.find_spec("collapselab.fast") is not None
    digits = load_config("digits")
    assert (speed_hint(digits, "local") is not None) == installed
    if installed:
        assert "score.train_backend=native" in speed_hint(digits, "local")
        assert "\n" not in speed_hint(digits, "local")
    assert speed_hint(load_config("quickstart"), "local") is None  # a KDE score: no training
    narrow = load_config("quickstart", ["score.kind=mlp"])
    assert speed_hint(narrow, "batched") is None  # the vmapped ensemble takes these
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert speed_hint(digits, "local") is None  # not installed: nothing to suggest
