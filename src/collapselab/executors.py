"""Run every (α, seed) chain of an experiment and gather the results table.

``local`` runs chains one after another in this process. Results do not depend on the order
or on the executor: each chain (and each generation) draws from its own seeded streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config, build_config
from .errors import ConfigError
from .loop import run_chain
from .store import RunStore, atomic_write_text

log = logging.getLogger("collapselab")


@dataclass(frozen=True)
class ChainSpec:
    """One chain of the grid: α, seed and the values of the other swept keys."""

    alpha: float
    seed: int
    params: tuple = ()

    @property
    def param_dict(self) -> dict:
        return dict(self.params)

    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{extra + ' ' if extra else ''}alpha={self.alpha:g} seed={self.seed}"


def chains(cfg: Config) -> list[ChainSpec]:
    """Every chain of the sweep, in a fixed order (swept keys, then α, then seed)."""
    return [
        ChainSpec(a, s, tuple(p.items()))
        for p in cfg.sweep.combinations()
        for a in cfg.sweep.alphas
        for s in cfg.sweep.seeds
    ]


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
    def __init__(self, chain: ChainSpec, generation, log_path, cause):
        self.chain, self.generation = chain, generation
        super().__init__(
            f"chain {chain.label()} failed at generation {generation}: "
            f"{type(cause).__name__}: {cause} (log: {log_path})"
        )


def run_experiment(
    cfg: Config,
    store: RunStore,
    on_generation: Callable[[ChainSpec, int, float], None] | None = None,
):
    """Run or resume every chain, then write results.parquet. Returns the results table."""
    for chain in chains(cfg):
        params = chain.param_dict
        start = store.completed(chain.alpha, chain.seed, params)
        log.info("chain %s: %d/%d generations done", chain.label(), start, cfg.loop.generations)

        def cb(g, seconds, c=chain):
            log.info("%s generation %d done in %.2fs", c.label(), g, seconds)
            if on_generation is not None:
                on_generation(c, g, seconds)

        try:
            run_chain(cfg, chain.alpha, chain.seed, store, on_generation=cb, params=params)
        except Exception as exc:  # the cell and generation go into the message and the log
            log.exception("chain %s failed", chain.label())
            done = store.completed(chain.alpha, chain.seed, params)
            raise ChainFailed(chain, done, store.log_path, exc) from exc
    return store.write_results()


def default_out(cfg: Config) -> Path:
    return Path("runs") / cfg.name
