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
