"""The run directory (its tables: docs/api.md): atomic writes, cells, completion, results table.

    DIR/config.yaml
    DIR/results.parquet                      one row per measurement
    DIR/cells/alpha=<a>/seed=<s>/generation=<g>/
        train.npy, provenance.npy            q_g's training set and where each point came from
        samples.npy                          draws of p̂_{g+1}, the output of generation g's model
        model.safetensors                    when the score model has weights
        metrics.json                         written last, atomically: marks completion
    DIR/figures/*.png, DIR/report.html, DIR/run.log
    DIR/.lock                                the run's lock (flock), with its holder's pid

A generation counts as done only when its metrics.json exists; files are written to a
temporary name and renamed, so a killed run never leaves a half-written file under a final name.
metrics.json records the size and SHA-256 of every other file of its cell (``files``), which a
resume checks (:meth:`RunStore.verify_chain`). Swept values are encoded into single, safe path
components (:func:`cell_name`), never paths. A run holds an exclusive lock on DIR/.lock
(:func:`run_lock`) for as long as it writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CollapselabError
from ..files import (  # noqa: F401  (the run directory's file helpers, re-exported)
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_npy,
    new_file_mode,
    read_json,
    umask,
)

RESULT_COLUMNS = ["alpha", "seed", "generation", "metric", "estimator", "value", "stderr", "note"]


def fmt_key(v) -> str:
    """Directory-safe rendering of a swept value (alpha=0.1, seed=3)."""
    if isinstance(v, float):
        return repr(round(v, 12))
    return str(v)


_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-")
_NAME_LIMIT = 96  # longer encodings become a readable prefix and a hash (filenames <= 255 bytes)


def cell_name(v) -> str:
    """One path component for a swept value, distinct for distinct values: floats by their
    shortest round-trip ``repr``, integers and booleans as written, anything else (strings,
    lists) as ``str`` with every byte outside ``[A-Za-z0-9_.+-]`` (and a leading dot)
    percent-encoded — so ``../x`` becomes ``%2E.%2Fx``, never a path. Encodings longer than
    96 characters become their first 40 characters, ``~`` and 16 hex digits of their SHA-256
    (``~`` never occurs in an encoding, so the two forms cannot meet); the value itself is
    in the cell's rows."""
    if isinstance(v, bool) or isinstance(v, int):
        text = str(v)
    elif isinstance(v, float):
        text = repr(v)
    else:
        text = str(v)
    out = []
    for i, b in enumerate(text.encode()):
        safe = b in _SAFE_BYTES and not (i == 0 and b == ord("."))
        out.append(chr(b) if safe else f"%{b:02X}")
    name = "".join(out) or "~empty"  # no encoding contains "~" except the hashed form
    if len(name) > _NAME_LIMIT:
        name = f"{name[:40]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def legacy_cell_name(v) -> str | None:
    """The name earlier versions gave a swept value (:func:`fmt_key`), when it was one safe
    path component (else None: such cells were never inside the run directory)."""
    name = fmt_key(v)
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 255:
        return None
    return name


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_cell_metrics(cell: Path, meta: dict) -> None:
    """Complete a cell: metrics.json, written last and atomically, with ``files`` — the size
    and SHA-256 of every other file in the cell, as read back from disk — for resumes to check."""
    cell = Path(cell)
    files = {}
    for f in sorted(cell.iterdir()):
        if f.is_file() and f.name != "metrics.json" and not f.name.startswith("."):
            files[f.name] = {"size": f.stat().st_size, "sha256": file_digest(f)}
    atomic_write_json(cell / "metrics.json", {**meta, "files": files})


def _npy_complete(path: Path) -> bool:
    """An .npy file holds as many bytes as its header promises (a truncated copy does not)."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            read = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                    else fmt.read_array_header_2_0)
            shape, _, dtype = read(f)
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return os.path.getsize(path) == expected and not dtype.hasobject
    except Exception:  # a garbage header is damage, whatever numpy says about it
        return False


def cell_damage(cell: Path, verified: dict | None = None) -> str | None:
    """Why a completed cell (metrics.json present) cannot be trusted, or None when it can.

    metrics.json must parse, with a list of rows; every file it lists must have its recorded
    size and SHA-256. Cells written before the list existed are checked for their .npy files
    (present, as long as their headers say). ``verified`` caches cells already hashed in this
    process by their files' (inode, size, mtime), so a second look costs a few stat calls."""
    cell = Path(cell)
    try:
        stamp = tuple((f.name, *_stat_key(f)) for f in sorted(cell.iterdir())
                      if not f.name.startswith("."))
    except OSError as exc:
        return f"cannot list the cell ({exc.strerror})"
    if verified is not None and verified.get(cell) == stamp:
        return None
    try:
        meta = read_json(cell / "metrics.json")
    except (OSError, ValueError) as exc:
        return f"metrics.json is unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict) or not isinstance(meta.get("rows"), list):
        return "metrics.json has no rows"
    files = meta.get("files")
    if files is None:  # written before sizes and hashes were recorded
        for name in ("train.npy", "provenance.npy", "samples.npy"):
            if not _npy_complete(cell / name):
                return f"{name} is missing or truncated"
    elif not isinstance(files, dict):
        return "metrics.json has no valid file list"
    else:
        for name, rec in files.items():
            path = cell / name
            try:
                size = path.stat().st_size
            except OSError:
                return f"{name} is missing"
            want = rec.get("size") if isinstance(rec, dict) else None
            if size != want:
                return f"{name} has {size} bytes, {want} recorded"
            if file_digest(path) != rec.get("sha256"):
                return f"{name} does not match its recorded SHA-256"
    if verified is not None:
        verified[cell] = stamp
    return None


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def remove_stale_temporaries(root: Path) -> int:
    """Delete the ``.<name>.<random>.tmp`` files a killed writer left (atomic_write_bytes);
    only safe while the run directory's lock is held. Returns how many were removed."""
    n = 0
    root = Path(root)
    for path in [*root.glob(".*.tmp"), *root.glob("figures/.*.tmp"),
                 *(root / "cells").rglob(".*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            n += 1
    return n


# ---- the run directory's lock --------------------------------------------------------------
LOCK_NAME = ".lock"
_HELD: dict[str, list] = {}  # realpath of a run directory -> [fd, depth, mode] held here


class RunDirBusy(CollapselabError):
    """Another process holds the run directory's lock; the message names it."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    return (f"{info.get('command', 'a process')} (pid {info['pid']} on {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


@contextlib.contextmanager
def run_lock(root: Path, command: str = "collapselab run", *, shared: bool = False):
    """Hold the run directory's lock (flock on DIR/.lock) for the block.

    Exclusive for a run (config check, cells, results, report); shared for a reader that
    writes only its own files (report, bounds). Never waits: when another process holds a
    conflicting lock, raises :class:`RunDirBusy` naming it (pid, host, command, since when, as
    it wrote them into the lock file). The kernel releases an flock when its holder's file
    descriptor closes, so a killed run (kill -9, OOM, power loss of a local disk) leaves no
    stale lock behind: the next run takes it over at once; the pid written in the file is
    only for the message. Re-entrant within a process (an exclusive lock covers nested
    users). flock may not be enforced across machines on some network filesystems.
    """
    import fcntl

    root = Path(root)
    key = os.path.realpath(root)
    held = _HELD.get(key)
    if held is not None and (held[2] == "ex" or shared):
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~umask())
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        who = _holder(fd)
        os.close(fd)
        raise RunDirBusy(f"{root} is in use by {who}; wait for it to finish or choose "
                         "another --out") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass  # the lock holds without the note
    _HELD[key] = [fd, 1, "sh" if shared else "ex"]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock


def lock_holder(root: Path) -> str | None:
    """Who holds the run directory's lock exclusively (a run in progress), or None; takes
    nothing and creates nothing."""
    import fcntl

    held = _HELD.get(os.path.realpath(root))
    if held is not None:
        return None
    try:
        fd = os.open(Path(root) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def extra_first(df: pd.DataFrame) -> list[str]:
    """Sort order of the results table: swept keys, then α, seed, generation, metric."""
    swept = [c for c in df.columns if c not in RESULT_COLUMNS and "." in c]
    return swept + ["alpha", "seed", "generation", "metric", "estimator"]


class RunStore:
    """Paths and completion state of one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._verified: dict = {}

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def results_path(self) -> Path:
        return self.root / "results.parquet"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def chain_dir(self, alpha: float, seed: int, params: dict | None = None) -> Path:
        """cells/[<key>=<value>/ for each swept key]alpha=<a>/seed=<s>."""
        path = self.root / "cells"
        for key, value in (params or {}).items():
            path = path / f"{cell_name(key)}={cell_name(value)}"
        return path / f"alpha={cell_name(float(alpha))}" / f"seed={cell_name(int(seed))}"

    def legacy_chain_dir(self, alpha: float, seed: int, params: dict | None = None):
        """Where earlier versions put this chain (swept values by :func:`fmt_key`), or None
        when that was not a directory inside ``cells``."""
        parts = [(key, legacy_cell_name(value)) for key, value in (params or {}).items()]
        parts.append(("alpha", legacy_cell_name(float(alpha))))
        if any(name is None for _, name in parts):
            return None
        path = self.root / "cells"
        for key, name in parts:
            path = path / f"{key}={name}"
        return path / f"seed={seed}"

    def cell(self, alpha: float, seed: int, generation: int, params: dict | None = None) -> Path:
        return self.chain_dir(alpha, seed, params) / f"generation={generation}"

    def is_done(self, alpha: float, seed: int, generation: int, params: dict | None = None) -> bool:
        return (self.cell(alpha, seed, generation, params) / "metrics.json").exists()

    def completed(self, alpha: float, seed: int, params: dict | None = None) -> int:
        """Number of consecutive completed generations 0, 1, … of a chain."""
        g = 0
        while self.is_done(alpha, seed, g, params):
            g += 1
        return g

    def verify_chain(self, alpha: float, seed: int, params: dict | None = None,
                     label: str = "") -> int:
        """Check the chain's completed cells (:func:`cell_damage`) in order; at the first
        damaged one, un-complete it and every later generation (their metrics.json removed,
        so they are recomputed — later generations read the damaged one's files) and log one
        line. Returns the number of generations that stay completed."""
        g = 0
        while self.is_done(alpha, seed, g, params):
            why = cell_damage(self.cell(alpha, seed, g, params), self._verified)
            if why is not None:
                later = g
                while (self.cell(alpha, seed, later, params) / "metrics.json").exists():
                    later += 1
                for h in range(g, later):
                    (self.cell(alpha, seed, h, params) / "metrics.json").unlink(missing_ok=True)
                logging.getLogger("collapselab").warning(
                    "%s: generation %d is damaged (%s); recomputing generations %d-%d",
                    label or f"alpha={alpha:g} seed={seed}", g, why, g, max(g, later - 1))
                return g
            g += 1
        return g

    def rows(self, chain_dirs: list[Path] | None = None) -> list[dict]:
        """Rows of every completed cell (of the given chain directories only, when given)."""
        out = []
        roots = [self.root / "cells"] if chain_dirs is None else chain_dirs
        for path in sorted(p for root in roots for p in Path(root).rglob("metrics.json")):
            out.extend(read_json(path)["rows"])
        return out

    def collect(self, chain_dirs: list[Path] | None = None) -> pd.DataFrame:
        """Gather every completed cell's rows into the tidy results table (sorted, stable)."""
        rows = self.rows(chain_dirs)
        df = pd.DataFrame(rows)
        if df.empty:
            df = pd.DataFrame(columns=RESULT_COLUMNS)
        extra = [c for c in df.columns if c not in RESULT_COLUMNS]
        df = df[RESULT_COLUMNS + extra]
        df = df.sort_values(extra_first(df), kind="stable")
        return df.reset_index(drop=True)

    def write_results(self, chain_dirs: list[Path] | None = None) -> pd.DataFrame:
        df = self.collect(chain_dirs)
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(self.results_path, buf.getvalue())
        return df


# ---- failures (additions for the executors) ------------------------------------------------
def failure_path(store: RunStore, alpha: float, seed: int, params: dict | None = None) -> Path:
    """Per-chain failure record: present while the chain's last attempt failed."""
    return store.chain_dir(alpha, seed, params) / "failure.json"


def record_failure(store: RunStore, alpha: float, seed: int, params: dict | None, *,
                   label: str, generation: int, error: str, traceback: str = "") -> dict:
    """Write the chain's failure.json atomically: what failed, where, and the generation reached
    (the number of completed generations, i.e. the generation that was being computed)."""
    rec = {
        "chain": label,
        "alpha": float(alpha),
        "seed": int(seed),
        "params": dict(params or {}),
        "generation": int(generation),
        "error": error,
        "traceback": traceback,
        "log": str(store.log_path),
    }
    atomic_write_json(failure_path(store, alpha, seed, params), rec)
    return rec


def clear_failure(store: RunStore, alpha: float, seed: int, params: dict | None = None) -> None:
    failure_path(store, alpha, seed, params).unlink(missing_ok=True)


def failures(store: RunStore) -> list[dict]:
    """Every chain's current failure record, in a stable order."""
    cells = store.root / "cells"
    if not cells.exists():
        return []
    return [read_json(p) for p in sorted(cells.rglob("failure.json"))]


# ---- aggregation over seeds ----------------------------------------------------------------
SUMMARY_COLUMNS = ["alpha", "generation", "metric", "estimator", "mean", "ci_low", "ci_high",
                   "half_width", "std", "n", "n_nonfinite", "interval"]
# How summarize's interval was obtained (the ``interval`` column).
INTERVALS = {
    "t": "mean ± t_{n−1} s/√n (Student t over seeds)",
    "log-t": "mean · exp(± t_{n−1} s/(mean √n)): the t-interval of log(mean) by the delta "
             "method, for a metric whose values are all ≥ 0 (the interval stays ≥ 0)",
    "none": "fewer than two finite seed values: no interval",
}


def _nonnegative_metrics(df: pd.DataFrame) -> set:
    """Metrics whose every finite value is ≥ 0 (divergences, energies, distances, rates): their
    interval is computed on the log scale so that it never reaches below 0."""
    v = df["value"].to_numpy(float)
    neg = df.loc[np.isfinite(v) & (v < 0), "metric"].unique()
    return set(df["metric"].unique()) - set(neg)


def seed_interval(values, level: float = 0.95, nonnegative: bool = False) -> dict:
    """Mean over seeds of the finite ``values`` and a ``level`` interval that respects the
    support (:data:`INTERVALS`): keys mean, ci_low, ci_high, half_width ((high − low)/2),
    std, n, n_nonfinite, interval."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    fin = v[np.isfinite(v)]
    n = len(fin)
    mean = float(fin.mean()) if n else math.nan
    std = float(fin.std(ddof=1)) if n > 1 else math.nan
    lo = hi = math.nan
    method = "none"
    if n > 1:
        t = float(stats.t.ppf(0.5 + level / 2, n - 1))
        if nonnegative and mean >= 0:
            method = "log-t"
            if mean == 0:  # every value is 0
                lo = hi = 0.0
            else:
                with np.errstate(over="ignore"):
                    f = float(np.exp(t * std / (mean * math.sqrt(n))))
                lo, hi = mean / f, mean * f
        else:
            method = "t"
            half = t * std / math.sqrt(n)
            lo, hi = mean - half, mean + half
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "half_width": (hi - lo) / 2, "std": std,
            "n": n, "n_nonfinite": int(len(v) - n), "interval": method}


def summarize(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (swept keys, α, generation, metric, estimator): mean over seeds of the finite values,
    a ``level`` interval (:func:`seed_interval`: a t-interval, on the log scale for a metric
    whose values are all ≥ 0, so that no lower bound is negative; NaN with fewer than two
    finite seeds), the count of finite values and the number of non-finite (inf/NaN) values,
    which are left out of the mean and counted instead so that they are never averaged into a
    finite number."""
    swept = [c for c in df.columns if c not in RESULT_COLUMNS and "." in c]
    keys = swept + ["alpha", "generation", "metric", "estimator"]
    if df.empty:
        return pd.DataFrame(columns=swept + SUMMARY_COLUMNS)
    nonneg = _nonnegative_metrics(df)
    out = []
    for key, grp in df.groupby(keys, sort=True, dropna=False):
        k = dict(zip(keys, key, strict=True))
        out.append({**k, **seed_interval(grp["value"], level, k["metric"] in nonneg)})
    res = pd.DataFrame(out)
    return res[swept + SUMMARY_COLUMNS].reset_index(drop=True)


def write_summary(store: RunStore, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """DIR/summary.parquet and DIR/summary.csv from the results table (atomically)."""
    if df is None:
        df = pd.read_parquet(store.results_path) if store.results_path.exists() else store.collect()
    summ = summarize(df)
    buf = io.BytesIO()
    summ.to_parquet(buf, index=False)
    atomic_write_bytes(store.root / "summary.parquet", buf.getvalue())
    atomic_write_text(store.root / "summary.csv", summ.to_csv(index=False))
    return summ
