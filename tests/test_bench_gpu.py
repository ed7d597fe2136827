"""The GPU check script (benchmarks/bench_gpu.py) runs end to end; on CPU here, tiny sizes."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_cuda_is_a_one_line_error(capsys, monkeypatch):
    mod = _load()
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: False)
    assert mod.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


@pytest.mark.slow
def test_quick_run_on_cpu(tmp_path):
    """Every score model and sampler completes a run and the kernel matches float64."""
    out = tmp_path / "gpu.json"
    assert _load().main(["--device", "cpu", "--quick", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(r["ok"] for r in res["runs"]) and len(res["runs"]) == 9
    assert all(r["ok"] for r in res["accuracy"])
    assert res["projection"]["pairs_per_chain"] == 20 * 500 * 100_000 * 100_000


def test_gpu_only_parts_skip_on_cpu_and_bad_parts_exit_2(capsys):
    mod = _load()
    assert mod.main(["--device", "cpu", "--only", "5,6"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert mod.main(["--device", "cpu", "--only", "7"]) == 2
    assert "--only" in capsys.readouterr().err
