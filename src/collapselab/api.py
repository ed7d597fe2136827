"""The Python API: run an experiment from a script or a notebook, open a finished run.

    import collapselab
    run = collapselab.run("quickstart", out="runs/qs", overrides=["sweep.seeds=[0,1,2]"])
    run.results      # the tidy results table (pandas)
    run.summary      # mean and 95% interval over seeds
    run.report       # path of report.html
    run = collapselab.load("runs/qs")

:func:`run` does what ``collapselab run`` does — the same validation (a
:class:`~collapselab.errors.CollapselabError` before anything is written), the same worker
default, run.log, results, summary and report — and starts its worker processes so that the
caller's ``__main__`` (a script without an ``if __name__ == "__main__":`` guard, a notebook) is
never re-imported in them.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["GenerationDone", "Run", "default_workers", "load", "run", "setup_run_log"]


@dataclass(frozen=True)
class GenerationDone:
    """What ``on_generation`` receives after each finished generation of a chain."""

    alpha: float
    seed: int
    params: dict  # the chain's other swept keys ({} when only α and seed are swept)
    generation: int
    seconds: float  # compute time of the generation (fit + sample + measure)
    done: int  # generations finished so far in the whole run (resumed ones included)
    total: int  # generations of the whole run
    directory: Path  # the cell: DIR/cells/.../generation=<g>

    @property
    def rows(self) -> list[dict]:
        """The generation's rows of the results table (metric, estimator, value, stderr, …)."""
        from .engine.store import read_json

        return list(read_json(self.directory / "metrics.json").get("rows", []))


@dataclass
class Run:
    """A run directory: its tables are read when asked for (a run in progress shows what is
    done)."""

    dir: Path
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict:
        """The resolved configuration (config.yaml)."""
        import yaml

        return yaml.safe_load((self.dir / "config.yaml").read_text()) or {}

    @property
    def results(self) -> pd.DataFrame:
        """results.parquet: one row per measurement (see docs/api.md for the columns);
        ``held`` as pandas' nullable boolean (missing = no claim)."""
        df = pd.read_parquet(self.dir / "results.parquet")
        if "held" in df.columns:
            df["held"] = df["held"].astype("boolean")
        return df

    @property
    def summary(self) -> pd.DataFrame:
        """summary.parquet: mean over seeds and its 95% interval per (swept keys, α,
        generation, metric, estimator)."""
        return pd.read_parquet(self.dir / "summary.parquet")

    @property
    def report(self) -> Path | None:
        """Path of report.html (None when the report was not built)."""
        p = self.dir / "report.html"
        return p if p.exists() else None

    def build_report(self) -> Path:
        """(Re)build figures and report.html, as ``collapselab report DIR`` does."""
        from .report.run import build_report

        build_report(self.dir)
        return self.dir / "report.html"

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"


def load(directory) -> Run:
    """Open a finished (or partly finished) run directory."""
    from .errors import MissingFileError

    root = Path(directory)
    if not (root / "config.yaml").exists():
        raise MissingFileError(root / "config.yaml",
                               "not a run directory (create one with collapselab.run)")
    return Run(root)


def default_workers(cfg, executor: str = "local") -> int | None:
    """Worker default shared by the CLI and :func:`run`: for the local executor one chain per
    core (one torch thread each: in-process runs would otherwise use every core's thread for
    one chain, which oversubscribes as soon as anything else runs); the executors' own default
    otherwise (None)."""
    if executor != "local":
        return None
    from .engine.executors import chains

    return max(1, min(os.cpu_count() or 1, len(chains(cfg))))


def setup_run_log(path: Path) -> None:
    """Send the ``collapselab`` logger to DIR/run.log (as the CLI does)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("collapselab")
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)


@contextmanager
def main_hidden() -> Iterator[None]:
    """While worker processes start, show multiprocessing's spawn a ``__main__`` without a
    file or a module name, so the children do not re-import the caller's script or notebook
    kernel (a script without an ``if __name__ == "__main__":`` guard would otherwise run again
    in every worker). Workers only run collapselab's own module-level functions."""
    real = sys.modules.get("__main__")
    stub = types.ModuleType("__main__")
    sys.modules["__main__"] = stub
    try:
        yield
    finally:
        if real is not None:
            sys.modules["__main__"] = real


def run(source, out=None, overrides=(), *, workers: int | None = None,
        executor: str = "local", on_generation: Callable[[GenerationDone], None] | None = None,
        report: bool = True) -> Run:
    """Run (or resume) an experiment — a preset name, a YAML file or a config dict — into
    ``out`` (default ``runs/<name>``) and return the :class:`Run`.

    overrides: ``key.path=value`` strings, as ``--set`` (``["sweep.alphas=[0.2,0.8]"]``).
    workers: chains at once (default: one per core, at most one per chain, as the CLI).
    executor: ``local``, ``batched`` or ``ray`` (a local Ray; see docs/distributed.md).
    on_generation: called in this process with a :class:`GenerationDone` after every finished
        generation (e.g. to log to TensorBoard; docs/api.md).
    report: build figures and report.html at the end.
    Raises :class:`~collapselab.errors.CollapselabError` for invalid input (nothing written)
    and :class:`~collapselab.engine.executors.ChainFailed` when chains failed (the rest is saved;
    calling again resumes).
    """
    from .config import build_config, load_config
    from .engine.executors import chains, default_out, prepare_run_dir, run_experiment

    if isinstance(source, dict):
        import yaml

        from .config import apply_override, parse_override

        data = yaml.safe_load(yaml.safe_dump(source))  # a copy
        for text in overrides:
            apply_override(data, *parse_override(text))
        cfg = build_config(data)
    else:
        cfg = load_config(source, list(overrides))
    if cfg.target.kind == "dataset":
        from .engine.loop import build_target

        build_target(cfg)  # a missing data file is reported before anything is written
    if workers is None:
        workers = default_workers(cfg, executor)
    store = prepare_run_dir(cfg, Path(out) if out else default_out(cfg))
    setup_run_log(store.log_path)
    logging.getLogger("collapselab").info("run %s (Python API): executor=%s workers=%s",
                                          cfg.name, executor, workers)
    todo = chains(cfg)
    G = cfg.loop.generations
    done = [sum(min(store.completed(c.alpha, c.seed, c.param_dict), G) for c in todo)]

    def tick(chain, g, secs):
        done[0] += 1
        if on_generation is not None:
            on_generation(GenerationDone(
                alpha=chain.alpha, seed=chain.seed, params=chain.param_dict, generation=g,
                seconds=secs, done=done[0], total=len(todo) * G,
                directory=store.cell(chain.alpha, chain.seed, g, chain.param_dict)))

    # Ray starts its own workers (its driver reads __main__); the pools are spawned by us.
    hide = main_hidden() if executor != "ray" else nullcontext()
    with hide:
        run_experiment(cfg, store, on_generation=tick, executor=executor, workers=workers)
    if report:
        from .report.run import build_report

        build_report(store.root)
    return Run(store.root)
