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


def read_json(path: Path):
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, dict) and "rows" in obj:
        for r in obj["rows"]:
            for k in ("value", "stderr"):
                if isinstance(r.get(k), str):
                    r[k] = float(r[k])
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
