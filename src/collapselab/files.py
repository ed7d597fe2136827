"""Atomic file writes and checked reads: a file is written to a temporary name in its
directory and renamed, so a killed process never leaves a half-written file under a final
name; new files honour the process's umask."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

# results-table columns that hold text: a 'nan' there is a word, not a number
_TEXT_COLUMNS = {"metric", "estimator", "note"}


def umask() -> int:
    # Read without a race-free API: set and restore (Linux 4.7+ shows it in /proc/self/status).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def new_file_mode() -> int:
    """The mode a newly created file gets under the current umask (0o666 & ~umask)."""
    return 0o666 & ~umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; the final file gets the mode any other new file would have.
        os.fchmod(fd, new_file_mode())
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
