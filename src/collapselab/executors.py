"""Run every (α, seed) chain of an experiment and gather the results table.

``local`` runs chains one after another in this process. Results do not depend on the order
or on the executor: each chain (and each generation) draws from its own seeded streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from .config import Config, build_config
from .errors import ConfigError
from .loop import run_chain
from .store import RunStore, atomic_write_text

log = logging.getLogger("collapselab")


def chains(cfg: Config) -> list[tuple[float, int]]:
    return [(a, s) for a in cfg.sweep.alphas for s in cfg.sweep.seeds]


def prepare_run_dir(cfg: Config, out: Path) -> RunStore:
    """Create (or reopen for resuming) a run directory; refuses one of another config."""
    store = RunStore(out)
    if store.config_path.exists():
        try:
            old = build_config(yaml.safe_load(store.config_path.read_text()))
        except ConfigError:
            old = None
        if old is None or old.model_dump(exclude={"name", "description", "notes"}) != cfg.model_dump(
            exclude={"name", "description", "notes"}
        ):
            raise ConfigError(
                "--out", f"{out} holds a run with a different configuration; choose a new --out"
            )
    else:
        store.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(store.config_path, cfg.dump())
    return store


class ChainFailed(RuntimeError):
    def __init__(self, alpha, seed, generation, log_path, cause):
        self.alpha, self.seed, self.generation = alpha, seed, generation
        super().__init__(
            f"chain alpha={alpha} seed={seed} failed at generation {generation}: "
            f"{type(cause).__name__}: {cause} (log: {log_path})"
        )


def run_experiment(
    cfg: Config,
    store: RunStore,
    on_generation: Callable[[float, int, int, float], None] | None = None,
):
    """Run or resume every chain, then write results.parquet. Returns the results table."""
    for alpha, seed in chains(cfg):
        start = store.completed(alpha, seed)
        log.info("chain alpha=%s seed=%s: %d/%d generations done", alpha, seed, start,
                 cfg.loop.generations)

        def cb(g, seconds, a=alpha, s=seed):
            log.info("alpha=%s seed=%s generation %d done in %.2fs", a, s, g, seconds)
            if on_generation is not None:
                on_generation(a, s, g, seconds)

        try:
            run_chain(cfg, alpha, seed, store, on_generation=cb)
        except Exception as exc:  # the cell and generation go into the message and the log
            log.exception("chain alpha=%s seed=%s failed", alpha, seed)
            raise ChainFailed(alpha, seed, store.completed(alpha, seed), store.log_path, exc) from exc
    return store.write_results()


def default_out(cfg: Config) -> Path:
    return Path("runs") / cfg.name
