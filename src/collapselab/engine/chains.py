"""What every driver of chains shares: the chain's identity, generation-0 sharing, progress
read from the run directory, and the pool of spawned worker processes. Used by
:mod:`collapselab.engine.executors` (local, pool, Ray) and :mod:`collapselab.engine.lockstep`
(the batched executor)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from .store import RunStore, read_json

log = logging.getLogger("collapselab")

POLL_SECONDS = 0.25


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


def _exit_with_parent() -> None:
    """Stop this spawned worker as soon as its parent (the driver) is gone: once the driver
    is killed its run directory's lock is free, and a worker still writing cells would race
    the next run."""
    import multiprocessing as mp
    import threading

    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()
        os._exit(3)

    threading.Thread(target=watch, name="collapselab-parent-watch", daemon=True).start()


def _worker_main(conn) -> None:
    """A pool worker: one torch thread, one task at a time, until it receives None. A task is
    ``entry`` — a module-level function (:func:`collapselab.engine.executors.execute_chain` for one
    chain, :func:`collapselab.engine.lockstep.run_part` for a part of the batched executor) — with
    its
    keyword arguments. It exits when the driver dies."""
    _exit_with_parent()
    import torch

    torch.set_num_threads(1)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        entry = task.pop("entry")
        conn.send(entry(**task))


# ---- generation 0 sharing (every driver) ---------------------------------------------------
def generation_zero_source(cfg: Config, store: RunStore, params: dict, seed: int) -> float | None:
    """An α whose generation 0 of (params, seed) is done (its files serve every α), or None."""
    for a in cfg.sweep.alphas:
        if store.is_done(a, seed, 0, params):
            return a
    return None


def adopt_generation_zero_for(store: RunStore, src_alpha: float, members) -> None:
    """Copy generation 0 of (src_alpha, seed, params) to each chain of ``members`` (same seed
    and params) that does not have it yet (:func:`loop.adopt_generation_zero`)."""
    from .loop import adopt_generation_zero

    for c in members:
        if adopt_generation_zero(store, src_alpha, c.alpha, c.seed, c.param_dict):
            log.info("%s: generation 0 adopted from alpha=%g", c.label(), src_alpha)


# ---- progress observed in the run directory (every driver whose chains run elsewhere) -------
def report_new_cells(store: RunStore, c: ChainSpec, seen: int, generations: int,
                     on_generation: Callable[[ChainSpec, int, float], None] | None) -> int:
    """Report the generations of chain ``c`` completed since the last look (``seen`` of them
    were then) and return the new count: log "generation g done" and call ``on_generation``
    with the seconds its metrics.json timings add up to (a generation 0 adopted from another
    α included, with its copied timings: a progress bar counts every cell)."""
    while seen < generations and store.is_done(c.alpha, c.seed, seen, c.param_dict):
        g, seen = seen, seen + 1
        meta = read_json(store.cell(c.alpha, c.seed, g, c.param_dict) / "metrics.json")
        secs = float(sum((meta.get("timings") or {}).values()))
        log.info("%s generation %d done in %.2fs", c.label(), g, secs)
        if on_generation is not None:
            on_generation(c, g, secs)
    return seen


def died(message: str) -> dict:
    return {"ok": False, "error": message, "traceback": ""}


class WorkerPool:
    """Long-lived spawned workers, each running one task (a chain, or a part of the batched
    executor) at a time over its own pipe, so a worker that dies is attributed to exactly that
    task and no other is disturbed (a concurrent.futures pool would break, and terminate every
    worker, as a whole). A dead worker is replaced on demand. A task is ``{"entry": function,
    **its keyword arguments}`` (see :func:`_worker_main`)."""

    def __init__(self, workers: int, task: str = "the chain"):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
        self.capacity = workers
        self.task = task  # what a dead worker was running, for the failure record
        self.slots: list[dict | None] = [None] * workers

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                name=f"collapselab-worker-{i}")
        proc.start()
        child.close()
        self.slots[i] = {"proc": proc, "conn": parent, "task": None}

    def submit(self, task_id, kwargs):
        for i, slot in enumerate(self.slots):
            if slot is None:
                self._start(i)
                slot = self.slots[i]
            if slot["task"] is None:
                slot["task"] = task_id
                slot["conn"].send(kwargs)
                return
        raise RuntimeError("no idle worker")  # the driver never submits beyond capacity

    def wait(self, timeout):
        from multiprocessing.connection import wait

        busy = [s for s in self.slots if s is not None and s["task"] is not None]
        if not busy:
            return []
        ready = wait([s["conn"] for s in busy] + [s["proc"].sentinel for s in busy], timeout)
        out = []
        for i, slot in enumerate(self.slots):
            if slot is None or slot["task"] is None:
                continue
            if slot["conn"] not in ready and slot["proc"].sentinel not in ready:
                continue
            try:
                result = slot["conn"].recv()
            except (EOFError, OSError):
                slot["proc"].join(5)
                code = slot["proc"].exitcode
                result = died(f"worker process died (exit code {code}) while running {self.task}")
                slot["conn"].close()
                self.slots[i] = None
                out.append((slot["task"], result))
                continue
            out.append((slot["task"], result))
            slot["task"] = None
        return out

    def close(self):
        for slot in self.slots:
            if slot is None:
                continue
            try:
                slot["conn"].send(None)
            except OSError:
                pass
        for slot in self.slots:
            if slot is None:
                continue
            slot["proc"].join(10)
            if slot["proc"].is_alive():
                slot["proc"].terminate()
                slot["proc"].join(5)
            slot["conn"].close()
