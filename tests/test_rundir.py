"""The run directory under hostile use: a second run on it, escaping or colliding swept values,
damaged cells, bad values caught before anything is written, leftovers of a killed run."""

import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from test_cli import invoke

from collapselab.cli import FIT_LOG_ENV
from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.engine.store import LOCK_NAME, atomic_write_bytes, cell_name, run_lock

BASE = ["--set", "loop.generations=1", "--set", "loop.n_train=120", "--set", "sampler.steps=10",
        "--set", "estimators.n_mc=300", "--set", "estimators.n_eval=120",
        "--set", "sweep.seeds=[0]", "--set", "pathwise.n_mc=50", "--set", "pathwise.n_paths=50",
        "--set", "pathwise.n_times=5", "--set", "pathwise.steps=20"]
TINY = BASE + ["--set", "sweep.alphas=[0.5]"]
# Three generations of two chains whose α has more than 12 significant digits (its cells were
# named differently by earlier versions).
THIRD = 0.333333333333333333
SMALL3 = ["loop.generations=3", "loop.n_train=120", "sampler.steps=10", "estimators.n_mc=300",
          "estimators.n_eval=120", f"sweep.alphas=[0.1, {THIRD!r}]", "sweep.seeds=[0]",
          "pathwise.n_mc=50", "pathwise.n_paths=50", "pathwise.n_times=5", "pathwise.steps=20"]


def one_line(r, code=2):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return lines[0]


def fits(path):
    if not path.exists():
        return []
    return sorted((float(a), int(s), int(g)) for a, s, g, _ in
                  (line.split(" ", 3) for line in path.read_text().splitlines()))


@pytest.fixture(scope="module")
def cfg3():
    return load_config("quickstart", SMALL3)


@pytest.fixture(scope="module")
def clean(cfg3, tmp_path_factory):
    """An uninterrupted run of SMALL3: the reference every repaired run must equal."""
    store = prepare_run_dir(cfg3, tmp_path_factory.mktemp("clean") / "run")
    run_experiment(cfg3, store)
    return store


def copy_run(store, dst):
    shutil.copytree(store.root, dst)
    (dst / LOCK_NAME).unlink(missing_ok=True)
    return dst


# ---- 1. one run per directory ----------------------------------------------------------------
def test_second_run_is_refused_naming_the_holder_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # Another process's lock, made deterministic: this test holds it on its own descriptor.
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "otherhost", "command": "collapselab run",
                             "since": "then"}).encode())
    try:
        for extra in ([], ["--set", "score.bandwidth=0.45"]):  # same or another configuration
            r = invoke("run", "quickstart", "--out", str(out), "--quiet", *TINY, *extra)
            line = one_line(r)
            assert "pid 4242 on otherhost" in line and "in use" in line
            assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        os.close(fd)
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *TINY)
    assert r.returncode == 0, r.stderr


def test_observability_run_takes_the_lock_too(tmp_path):
    out = tmp_path / "obs"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        line = one_line(invoke("run", "observability", "--out", str(out), "--quiet"))
        assert "in use by another process" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        os.close(fd)


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from collapselab.engine.store import run_lock
            with run_lock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *TINY)
        assert f"pid {holder.pid}" in one_line(r)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *TINY)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_parquet(out / "results.parquet"))


def test_report_and_bounds_during_a_run_warn_and_read_whole_files(clean, tmp_path):
    out = copy_run(clean, tmp_path / "run")
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 99, "host": "h", "command": "collapselab run"}).encode())
    try:
        for cmd in (["report"], ["bounds", "--no-figures"]):
            r = invoke(*cmd, str(out))
            assert r.returncode == 0, r.stderr
            assert "warning: collapselab run (pid 99 on h" in r.stderr
    finally:
        os.close(fd)
    # While a report holds the lock (shared), a run does not start.
    with run_lock(out, "collapselab report", shared=True):
        fd = os.open(out / LOCK_NAME, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


def test_run_experiment_checks_the_configuration_under_the_lock(cfg3, clean, tmp_path):
    # Another process prepared the directory for another configuration in between.
    out = copy_run(clean, tmp_path / "run")
    other = load_config("quickstart", SMALL3 + ["score.bandwidth=0.45"])
    store = prepare_run_dir(cfg3, out)
    (out / "config.yaml").write_text(other.dump())
    with pytest.raises(Exception, match="different configuration"):
        run_experiment(cfg3, store)


# ---- 2 and 4. cell names -------------------------------------------------------------------
def test_cell_names_are_single_safe_components_and_distinct():
    values = ["../../../../escape", "a/b", ".", "..", ".hidden", "x y", "%2F", "/", "", "é",
              "a" * 300, "a" * 299 + "b", 0.1, 0.1000000000001, 1, 1.0, True, "True", -0.0, 0.0,
              [0.5, 0.5], "[0.5, 0.5]", None, math.inf, 2**63 - 1]
    names = [cell_name(v) for v in values]
    for v, n in zip(values, names, strict=True):
        assert n and "/" not in n and "\0" not in n and not n.startswith("."), (v, n)
        assert len(n.encode()) <= 100 and n not in (".", "..")
    # Distinct except where str() itself is the same text ("True" and True, a list and its str).
    assert len(set(names)) == len(values) - 2
    # Ordinary values keep the documented alpha=<a>/seed=<s> layout.
    assert [cell_name(v) for v in (0.1, 0.5, 1.0, 0, 3, 0.25)] == ["0.1", "0.5", "1.0", "0",
                                                                    "3", "0.25"]


def test_swept_paths_stay_inside_out(tmp_path):
    base = tmp_path / "a" / "b" / "c" / "d"
    out = base / "run"
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *TINY,
               "--set", 'sweep.target.root=["../../../../escape", "rel/x.npy"]')
    assert r.returncode == 0, r.stderr
    outside = [p for p in tmp_path.rglob("*") if out not in p.parents and p != out
               and p not in out.parents]
    assert outside == []
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["target.root"]) == {"../../../../escape", "rel/x.npy"}
    names = sorted(p.name for p in (out / "cells").iterdir())
    assert names == ["target.root=%2E.%2F..%2F..%2F..%2Fescape", "target.root=rel%2Fx.npy"]


def test_nearly_equal_values_get_distinct_cells_and_duplicates_are_refused(tmp_path):
    out = tmp_path / "run"
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *BASE,
               "--set", "sweep.alphas=[0.1,0.1000000000001]")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(set(df.alpha)) == [0.1, 0.1000000000001]
    assert len(df[df.alpha == 0.1]) == len(df[df.alpha == 0.1000000000001])
    assert (out / "cells/alpha=0.1000000000001/seed=0/generation=0/metrics.json").exists()
    for bad, field in (("sweep.alphas=[0.1,0.1]", "sweep.alphas"),
                       ("sweep.seeds=[3,3]", "sweep.seeds"),
                       ("sweep.score.bandwidth=[0.3,0.3]", "sweep.score.bandwidth")):
        new = tmp_path / field
        line = one_line(invoke("run", "quickstart", "--out", str(new), "--set", bad))
        assert field in line and "twice" in line
        assert not new.exists()


def test_run_dirs_of_earlier_versions_resume_without_recomputing(cfg3, clean, tmp_path,
                                                                fit_log):
    out = copy_run(clean, tmp_path / "run")
    # As an earlier version wrote it: α rounded to 12 digits in the name, no file list.
    os.rename(out / f"cells/alpha={THIRD!r}", out / "cells/alpha=0.333333333333")
    for m in (out / "cells").rglob("metrics.json"):
        meta = json.loads(m.read_text())
        del meta["files"]
        m.write_text(json.dumps(meta))
    (out / "results.parquet").unlink()
    run_experiment(cfg3, prepare_run_dir(cfg3, out), hooks=fit_log)
    assert fits(Path(fit_log.fit_log)) == []
    assert (out / f"cells/alpha={THIRD!r}/seed=0/generation=2/metrics.json").exists()
    assert (out / "results.parquet").read_bytes() == clean.results_path.read_bytes()


# ---- 3. damaged cells ----------------------------------------------------------------------
@pytest.mark.parametrize("damage, generation", [
    ("truncate samples.npy", 1),
    ("garbage metrics.json", 0),
    ("flip a byte of train.npy", 2),
    ("delete provenance.npy", 1),
])
def test_damaged_generation_and_the_rest_of_its_chain_are_recomputed(cfg3, clean, tmp_path,
                                                                      monkeypatch, damage,
                                                                      generation):
    out = copy_run(clean, tmp_path / "run")
    cell = out / f"cells/alpha=0.1/seed=0/generation={generation}"
    if damage.startswith("truncate"):
        p = cell / "samples.npy"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage.startswith("garbage"):
        (cell / "metrics.json").write_bytes(b"\x00{not json")
    elif damage.startswith("flip"):
        p = cell / "train.npy"
        b = bytearray(p.read_bytes())
        b[-3] ^= 0xFF
        p.write_bytes(bytes(b))
    else:
        (cell / "provenance.npy").unlink()
    (out / "results.parquet").write_bytes(b"stale")
    log = tmp_path / "fits.txt"
    monkeypatch.setenv(FIT_LOG_ENV, str(log))
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report",
               *[x for s in SMALL3 for x in ("--set", s)])
    assert r.returncode == 0, r.stderr
    # Generation 0 of α = 0.1 is the seed's shared one: damaged, it is adopted back from
    # the other α instead of being trained again.
    expected = [(0.1, 0, g) for g in range(max(generation, 1), 3)]
    assert fits(log) == expected
    lines = [x for x in (out / "run.log").read_text().splitlines() if "damaged" in x]
    assert len(lines) == 1 and f"generation {generation} is damaged" in lines[0]
    assert (out / "results.parquet").read_bytes() == clean.results_path.read_bytes()


# ---- 5 and the rest: bad input, exit 2, one line, nothing written ----------------------------
@pytest.mark.parametrize("override, field", [
    ("sweep.seeds=[18446744073709551616]", "sweep.seeds"),
    ("sweep.seeds=[9223372036854775808]", "sweep.seeds"),
    ("sampler.t0=0", "sampler.schedule"),
    ("sampler.t0=0 sampler.schedule=uniform", "sampler.t0"),
    ("sampler.t0=0 sampler.schedule=edm", "sampler.t0"),
    ("score.bandwidth=inf", "score.bandwidth"),
    ("score.bandwidth=1e300", "score.bandwidth"),
    ("score.bandwidth=.nan", "score.bandwidth"),
    ("device=cuda:x", "device"),
    ("loop.n_train=1", "loop.n_train"),
    ("estimators.n_eval=1", "estimators.n_eval"),
    ("loop.generations=true", "loop.generations"),
    ("sweep.score.bandwidth=5", "sweep.score.bandwidth"),
    ("sweep.score.bandwidth=[-1]", "sweep.score.bandwidth"),
])
def test_values_the_run_would_die_on_exit_2_before_writing(tmp_path, override, field):
    out = tmp_path / "run"
    sets = [x for o in override.split(" ") for x in ("--set", o)]
    line = one_line(invoke("run", "quickstart", "--out", str(out), *sets))
    assert line.startswith(f"error: {field}"), line
    assert "sweep.grid" not in line
    assert not out.exists()


def test_cuda_without_cuda_exits_2_before_writing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for dev in ("cuda", "cuda:0"):
        out = tmp_path / dev
        line = one_line(invoke("run", "quickstart", "--out", str(out), *TINY,
                               "--set", f"device={dev}"))
        assert line.startswith("error: device:") and "CUDA is not available" in line
        assert not out.exists()


def test_unusable_config_files_exit_2(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(256)))
    empty = tmp_path / "e.yaml"
    empty.write_text("# nothing\n")
    for source, what in ((tmp_path, "directory"), (binary, "not a YAML file"),
                         (empty, "empty")):
        out = tmp_path / "out"
        line = one_line(invoke("run", str(source), "--out", str(out)))
        assert what in line, line
        assert not out.exists()


def test_unwritable_out_exits_2(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    for out in (afile, afile / "run"):
        line = one_line(invoke("run", "quickstart", "--out", str(out), *TINY))
        assert "--out" in line and ("not a directory" in line or "is a file" in line)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        line = one_line(invoke("run", "quickstart", "--out", str(ro / "run"), *TINY))
        assert "--out" in line and "cannot write" in line


def test_damaged_config_or_results_in_out(clean, tmp_path):
    out = copy_run(clean, tmp_path / "run")
    args = [x for s in SMALL3 for x in ("--set", s)]
    (out / "results.parquet").write_bytes(b"PAR1 garbage")
    for cmd in (["report"], ["bounds"]):
        line = one_line(invoke(*cmd, str(out)))
        assert "results.parquet is damaged" in line
    # run rebuilds results.parquet from the cells
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *args)
    assert r.returncode == 0, r.stderr
    assert (out / "results.parquet").read_bytes() == clean.results_path.read_bytes()
    (out / "config.yaml").write_bytes(b"\xff\xfe: [")
    for cmd in (["report"], ["bounds"]):
        assert "config.yaml is damaged" in one_line(invoke(*cmd, str(out)))
    line = one_line(invoke("run", "quickstart", "--out", str(out), "--quiet", *args))
    assert "--out" in line and "damaged config.yaml" in line


def test_a_directory_without_completed_cells_takes_the_corrected_command(tmp_path):
    out = tmp_path / "run"
    # What a run stopped before its first cell leaves: another config.yaml, no cell.
    out.mkdir()
    (out / "config.yaml").write_text(load_config("quickstart", ["score.bandwidth=0.45"]).dump())
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *TINY)
    assert r.returncode == 0, r.stderr
    assert "bandwidth: 0.3" in (out / "config.yaml").read_text()


# ---- smaller -------------------------------------------------------------------------------
def test_divergence_message_names_a_real_key():
    from collapselab.scores.training import TrainingDivergedError

    msg = str(TrainingDivergedError(3, float("nan")))
    assert "grad_clip" not in msg and "score.lr" in msg


def test_duplicate_keys_and_repeated_set_warn(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nloop:\n  generations: 2\n  generations: 3\n")
    r = invoke("run", str(cfg), "--out", str(tmp_path / "o"), "--set", "loop.n_train=100",
               "--set", "loop.n_train=1")
    warns = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
    assert len(warns) == 2
    assert any("'generations' given twice (line 4)" in w for w in warns)
    assert any("--set loop.n_train given twice" in w for w in warns)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: loop.n_train")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    import torch

    from collapselab.scores.training import save_checkpoint

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
        save_checkpoint(tmp_path / "model.safetensors", torch.nn.Linear(2, 2))
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == mode


def test_leftover_temporaries_are_removed_and_results_unchanged(cfg3, clean, tmp_path):
    out = copy_run(clean, tmp_path / "run")
    left = [out / ".results.parquet.x1.tmp",
            out / "cells/alpha=0.1/seed=0/generation=1/.samples.npy.ab12.tmp"]
    for p in left:
        p.write_bytes(b"half")
    run_experiment(cfg3, prepare_run_dir(cfg3, out))
    assert not any(p.exists() for p in left)
    assert not list(out.rglob("*.tmp"))
    assert (out / "results.parquet").read_bytes() == clean.results_path.read_bytes()


def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_pool_workers_stop_when_the_driver_is_killed(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "fits.txt"
    args = [a if a != "loop.generations=1" else "loop.generations=40" for a in BASE]
    args = [a if a != "sweep.seeds=[0]" else "sweep.seeds=[0,1]" for a in args]
    args += ["--set", "sweep.alphas=[0.5]"]
    env = {**os.environ, FIT_LOG_ENV: str(log)}
    driver = subprocess.Popen([sys.executable, "-m", "collapselab.cli", "run", "quickstart",
                               "--out", str(out), "--quiet", "--no-report", "--workers", "2",
                               *args], env=env)
    try:
        deadline = time.monotonic() + 120
        while len({s for _, s, _ in fits(log)}) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until both workers are computing (a fit logs as it starts)
        assert len({s for _, s, _ in fits(log)}) == 2
        workers = [p for p in _children(driver.pid)
                   if b"multiprocessing" in Path(f"/proc/{p}/cmdline").read_bytes()
                   and b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 2.0
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)
    n = len(fits(log))
    time.sleep(1.0)
    assert len(fits(log)) == n  # nothing computed after the driver died
