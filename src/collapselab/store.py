"""The run directory (DESIGN.md "Contracts"): atomic writes, cells, completion, results table.

    DIR/config.yaml
    DIR/results.parquet                      one row per measurement
    DIR/cells/alpha=<a>/seed=<s>/generation=<g>/
        train.npy, provenance.npy            q_g's training set and where each point came from
        samples.npy                          draws of p̂_{g+1}, the output of generation g's model
        model.safetensors                    when the score model has weights
        metrics.json                         written last, atomically: marks completion
    DIR/figures/*.png, DIR/report.html, DIR/run.log

A generation counts as done only when its metrics.json exists; files are written to a
temporary name and renamed, so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

RESULT_COLUMNS = ["alpha", "seed", "generation", "metric", "estimator", "value", "stderr", "note"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _clean(v):
    # JSON has no inf/nan: store them as strings and restore on read.
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def atomic_write_json(path: Path, obj) -> None:
    if isinstance(obj, dict) and "rows" in obj:
        obj = {**obj, "rows": [{k: _clean(v) for k, v in r.items()} for r in obj["rows"]]}
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default))


_TEXT_COLUMNS = {"metric", "estimator", "note"}


def read_json(path: Path):
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, dict) and "rows" in obj:
        for r in obj["rows"]:
            for k, v in r.items():
                # _clean wrote non-finite floats as strings; text columns stay text.
                if k not in _TEXT_COLUMNS and v in ("nan", "inf", "-inf"):
                    r[k] = float(v)
    return obj


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def fmt_key(v) -> str:
    """Directory-safe rendering of a swept value (alpha=0.1, seed=3)."""
    if isinstance(v, float):
        return repr(round(v, 12))
    return str(v)


def extra_first(df: pd.DataFrame) -> list[str]:
    """Sort order of the results table: swept keys, then α, seed, generation, metric."""
    swept = [c for c in df.columns if c not in RESULT_COLUMNS and "." in c]
    return swept + ["alpha", "seed", "generation", "metric", "estimator"]


class RunStore:
    """Paths and completion state of one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

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
            path = path / f"{key}={fmt_key(value)}"
        return path / f"alpha={fmt_key(alpha)}" / f"seed={seed}"

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

    def rows(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "cells").rglob("metrics.json")):
            out.extend(read_json(path)["rows"])
        return out

    def collect(self) -> pd.DataFrame:
        """Gather every completed cell's rows into the tidy results table (sorted, stable)."""
        rows = self.rows()
        df = pd.DataFrame(rows)
        if df.empty:
            df = pd.DataFrame(columns=RESULT_COLUMNS)
        extra = [c for c in df.columns if c not in RESULT_COLUMNS]
        df = df[RESULT_COLUMNS + extra]
        df = df.sort_values(extra_first(df), kind="stable")
        return df.reset_index(drop=True)

    def write_results(self) -> pd.DataFrame:
        df = self.collect()
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
                   "half_width", "std", "n", "n_nonfinite"]


def summarize(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (swept keys, α, generation, metric, estimator): mean over seeds of the finite values,
    a ``level`` t-interval (mean ± t_{n−1} s/√n; NaN with fewer than two finite seeds), the
    count of finite values and the number of non-finite (inf/NaN) values, which are left out of
    the mean and counted instead so that they are never averaged into a finite number."""
    from scipy import stats

    swept = [c for c in df.columns if c not in RESULT_COLUMNS and "." in c]
    keys = swept + ["alpha", "generation", "metric", "estimator"]
    if df.empty:
        return pd.DataFrame(columns=swept + SUMMARY_COLUMNS)
    out = []
    for key, grp in df.groupby(keys, sort=True, dropna=False):
        v = grp["value"].to_numpy(float)
        fin = v[np.isfinite(v)]
        n = len(fin)
        mean = float(fin.mean()) if n else math.nan
        std = float(fin.std(ddof=1)) if n > 1 else math.nan
        t = stats.t.ppf(0.5 + level / 2, n - 1) if n > 1 else math.nan
        half = float(t * std / math.sqrt(n)) if n > 1 else math.nan
        out.append({**dict(zip(keys, key, strict=True)), "mean": mean, "ci_low": mean - half,
                    "ci_high": mean + half, "half_width": half, "std": std, "n": n,
                    "n_nonfinite": int(len(v) - n)})
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
