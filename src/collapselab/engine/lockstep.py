"""The batched executor (``--executor batched``): the chains of a group advanced in lockstep.

A group is the chains of one assignment of the swept keys other than α and seed; they fit the
same architecture on training sets of the same size. Each round takes the group's pending
chains at the smallest next generation i (chains resumed further along wait for the others)
and, in this process:

1. builds every chain's training set of q_i (:meth:`loop.ChainRunner.prepare`, as run_chain);
2. fits their MLP nets together (:func:`loop.fit_scores_batched`: PyTorch's vmapped
   ensemble by default, or the trainer ``score.train_backend`` names; one call per shape
   should the chains' training sets differ in shape); other score kinds are fitted one by one
   as run_chain fits them;
3. samples, measures and writes each chain's cell (:meth:`loop.ChainRunner.finish`).

Chain k of a batched fit gets the network :func:`loop.fit_score` would give it: the same
init, seed, warm start, schedule and draws, and the same arithmetic up to float rounding
(a batched product may sum in another order than a single one). So results equal the local
executor's up to float rounding, and a resumed run reproduces the uninterrupted one likewise
whatever generations its chains restart at.

Generation 0 does not depend on α: it is computed for the first α of each seed only (batched
across seeds) and adopted by the other α (:func:`loop.adopt_generation_zero`), as the other
executors do. A chain that fails (an exception while preparing, fitting or finishing; a
diverged training, :class:`~collapselab.scores.training.TrainingDivergedError` with ``.chain``;
non-finite samples) is recorded like any failure and dropped from the lockstep; a divergence
inside a batched fit re-runs the fit for the remaining chains (a chain's result does not
depend on the other chains of its batch). The others go on; the caller raises ChainFailed.

Processes (:func:`grouped`, ``--workers W``): the (params, seed) groups of chains — every α
of one seed, so generation 0 stays shared inside a part — are dealt round-robin over
min(W, number of groups) parts, and each part runs :func:`run_lockstep` in its own spawned
process with W // parts torch threads (at least one). Two processes of half the chains each
beat one process whose batched fits are split into two thread shards (the shards contend for
the GIL; sampling and measuring, one chain after another, then use both cores too). With one
part (W = 1, or a single group) the lockstep runs in this process with W threads. The parent
reports progress from the run directory, as the other executors' drivers do, and stands in
for a part whose process dies: its unfinished chains are recorded as failed, the other parts
go on. A part's results equal those of any run of the same chains, batched with others or
not.
"""

from __future__ import annotations

import logging
import os
import time
import traceback as tb
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, build_config
from .chains import (
    ChainSpec,
    adopt_generation_zero_for,
    generation_zero_source,
    report_new_cells,
)
from .hooks import Hooks
from .store import RunStore, clear_failure, failure_path, read_json, record_failure

log = logging.getLogger("collapselab")


@dataclass
class LockstepOutcome:
    """What :func:`run_lockstep` reports back: failure records per chain (in the order they
    failed) and the number of chains that computed generation 0 now."""

    failed: dict[ChainSpec, dict] = field(default_factory=dict)
    gen0_trained: int = 0


@dataclass
class _Item:
    """One chain's generation in flight: prepared, then fitted, then finished."""

    chain: ChainSpec
    runner: object
    train: object
    q_law: object
    seconds: float  # preparing (and, once fitted, its share of the fit)
    score: object = None
    state: object = None


def run_lockstep(
    cfg: Config,
    store: RunStore,
    specs: list[ChainSpec],
    on_generation: Callable[[ChainSpec, int, float], None] | None,
    hooks: dict,
    *,
    threads: int,
) -> LockstepOutcome:
    """Run or resume ``specs`` group by group, generation by generation (module docstring).

    hooks: the test hooks as plain data (:meth:`Hooks.as_dict`), called before each fit.
    threads: torch's intra-op threads for the run (restored afterwards) and the shards of each
    batched fit (:func:`grouped` gives each process its share of ``--workers``).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    lock = _Lockstep(cfg, store, on_generation, hooks, max(1, int(threads)))
    try:
        groups: dict[tuple, list[ChainSpec]] = {}
        for c in specs:
            groups.setdefault(c.params, []).append(c)
        for members in groups.values():
            lock.run_group(members)
    finally:
        torch.set_num_threads(previous)
    return lock.outcome


def partition(specs: list[ChainSpec], workers: int) -> list[list[ChainSpec]]:
    """``specs`` dealt over min(workers, number of (params, seed) groups) parts: the groups
    round-robin in order of first appearance, every α of a group in the same part (they share
    its generation 0), each part's chains in the order of ``specs``."""
    groups: dict[tuple, int] = {}
    for c in specs:
        groups.setdefault((c.params, c.seed), len(groups))
    n = max(1, min(int(workers), len(groups)))
    parts: list[list[ChainSpec]] = [[] for _ in range(n)]
    for c in specs:
        parts[groups[(c.params, c.seed)] % n].append(c)
    return parts


def grouped(cfg: Config, store: RunStore, specs: list[ChainSpec],
            on_generation: Callable[[ChainSpec, int, float], None] | None, hooks: dict, *,
            workers: int) -> Grouped:
    """The batched executor's policy for :class:`executors.Scheduler` with ``workers`` cores:
    :func:`partition` the chains; the one part runs in this process with ``workers`` threads,
    several parts each in its own spawned process with ``workers // parts`` threads (module
    docstring)."""
    parts = partition(specs, workers)
    in_process = len(parts) == 1
    threads = int(workers) if in_process else max(1, int(workers) // len(parts))
    return Grouped(cfg, store, parts, on_generation, hooks, threads=threads,
                   in_process=in_process)


def run_part(cfg_data: dict, root: str, specs: list[ChainSpec], hooks: dict,
             threads: int) -> dict:
    """One part in a spawned process (a :class:`chains.WorkerPool` worker's entry): plain data
    in, plain data back — ``ok``, ``failed`` ([(chain, failure record)]), ``gen0_trained``; an
    error that is no chain's failure comes back as ``error`` / ``traceback`` for the parent
    to record against the part's unfinished chains."""
    # The parent logs the cells it sees and the failures returned; without a handler this
    # process's error records would also reach stderr (logging.lastResort), under the
    # progress display.
    logging.getLogger("collapselab").addHandler(logging.NullHandler())
    try:
        cfg = build_config(cfg_data)  # torch loads in run_lockstep, after the input is valid
        outcome = run_lockstep(cfg, RunStore(Path(root)), specs, None, hooks, threads=threads)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                "traceback": tb.format_exc()}
    return {"ok": True, "failed": list(outcome.failed.items()),
            "gen0_trained": outcome.gen0_trained}


def run_part_here(cfg: Config, store: RunStore, specs: list[ChainSpec], on_generation,
                  hooks: dict, threads: int) -> dict:
    """The one part run in this process (the scheduler's in-process back-end): the lockstep
    reports progress and logs failures itself; an error that is no chain's failure is raised."""
    outcome = run_lockstep(cfg, store, specs, on_generation, hooks, threads=threads)
    return {"ok": True, "failed": list(outcome.failed.items()),
            "gen0_trained": outcome.gen0_trained}


def _stamp(path: Path) -> tuple | None:
    """Identity of a file version (atomic writes replace the inode), None when absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class Grouped:
    """The grouped policy of :class:`executors.Scheduler` (``--executor batched``): a unit is
    a part — whole (params, seed) groups, so generation 0 is shared inside it — run by
    :func:`run_part` in a spawned process (progress read from the run directory, a dead
    process stood in for) or by :func:`run_part_here` in this process; the parts' outcomes
    are merged in part order when the scheduler closes the policy."""

    def __init__(self, cfg: Config, store: RunStore, parts: list[list[ChainSpec]],
                 on_generation, hooks: dict, *, threads: int, in_process: bool = False):
        self.cfg, self.store, self.parts = cfg, store, parts
        self.on_generation, self.hooks, self.threads = on_generation, hooks, threads
        self.in_process = in_process
        self.G = cfg.loop.generations
        self.initial = {c: store.completed(c.alpha, c.seed, c.param_dict)
                        for part in parts for c in part}
        self.seen = dict(self.initial)
        # Failure records as they were before the run: a dead process's chains keep the
        # records it wrote (its outcome is lost) but not stale ones of an earlier run.
        self.before = {c: _stamp(failure_path(store, c.alpha, c.seed, c.param_dict))
                       for c in self.initial}
        self.results: dict[int, dict] = {}
        self.ready: deque[int] = deque()
        self.running: set[int] = set()
        self.failed: dict[ChainSpec, dict] = {}
        self.gen0_trained = 0
        for i, part in enumerate(parts):
            if any(self.initial[c] < self.G for c in part):
                self.ready.append(i)
            else:  # nothing to compute: not dispatched (run_group would only do this)
                for c in part:
                    clear_failure(self.store, c.alpha, c.seed, c.param_dict)
                self.results[i] = {"ok": True, "failed": [], "gen0_trained": 0}
        if self.ready and not in_process:
            log.info("batched: %d parts in spawned processes, %d thread(s) each",
                     len(self.ready), self.threads)

    def starting(self, i: int) -> None:
        pass  # each chain's start is logged by the lockstep

    def task(self, i: int) -> dict:
        if self.in_process:
            return dict(entry=run_part_here, cfg=self.cfg, store=self.store,
                        specs=self.parts[i], on_generation=self.on_generation,
                        hooks=self.hooks, threads=self.threads)
        return dict(entry=run_part, cfg_data=self.cfg.model_dump(mode="json"),
                    root=str(self.store.root), specs=self.parts[i], hooks=self.hooks,
                    threads=self.threads)

    def finished(self, i: int, result: dict) -> None:
        self.running.discard(i)
        self.results[i] = result

    def close(self) -> None:
        outcome = LockstepOutcome()
        for i, part in enumerate(self.parts):
            self._merge(outcome, part, self.results[i])
        self.failed, self.gen0_trained = outcome.failed, outcome.gen0_trained

    def poll(self) -> None:
        """Report every cell completed since the last poll (once: ``seen`` only grows),
        adopted generation-0 cells included, as the other executors report them (a progress
        bar counts every cell)."""
        if self.in_process:
            return  # the lockstep in this process reports each cell itself
        for c, seen in self.seen.items():
            if seen < self.G:
                self.seen[c] = report_new_cells(self.store, c, seen, self.G, self.on_generation)

    def _merge(self, outcome: LockstepOutcome, part: list[ChainSpec], result: dict) -> None:
        if result["ok"]:
            failed = result["failed"]
            outcome.gen0_trained += result["gen0_trained"]
        else:  # the process died (or failed outside any chain): stand in for its outcome
            failed = [(c, self._lost(c, result)) for c in part
                      if self.store.completed(c.alpha, c.seed, c.param_dict) < self.G]
            outcome.gen0_trained += sum(self._computed_generation_zero(c) for c in part)
        for c, rec in failed:
            outcome.failed[c] = rec
            if self.in_process:
                continue  # logged by the lockstep as it failed
            log.error("%s failed at generation %d: %s\n%s", c.label(), rec["generation"],
                      rec["error"], rec.get("traceback", ""))

    def _lost(self, c: ChainSpec, result: dict) -> dict:
        """The failure record of an unfinished chain of a part whose outcome was lost: the one
        its process wrote during this run, else a new one with the part's error."""
        path = failure_path(self.store, c.alpha, c.seed, c.param_dict)
        if _stamp(path) not in (None, self.before[c]):
            return read_json(path)
        return record_failure(self.store, c.alpha, c.seed, c.param_dict, label=c.label(),
                              generation=self.store.completed(c.alpha, c.seed, c.param_dict),
                              error=result["error"], traceback=result.get("traceback", ""))

    def _computed_generation_zero(self, c: ChainSpec) -> bool:
        """Whether chain c computed its generation 0 in this run (not adopted, not before)."""
        cell0 = self.store.cell(c.alpha, c.seed, 0, c.param_dict) / "metrics.json"
        return (self.initial[c] == 0 and cell0.exists()
                and "shared_from_alpha" not in read_json(cell0))


class _Lockstep:
    def __init__(self, cfg: Config, store: RunStore, on_generation, hooks: dict, threads: int):
        self.cfg, self.store, self.on_generation = cfg, store, on_generation
        self.hooks, self.threads = Hooks.from_dict(hooks), threads  # plain data -> Hooks
        self.G = cfg.loop.generations
        self.next: dict[ChainSpec, int] = {}
        self.runners: dict[ChainSpec, object] = {}
        self.outcome = LockstepOutcome()

    # ---- scheduling ------------------------------------------------------------------------
    def run_group(self, members: list[ChainSpec]) -> None:
        pending = []
        for c in members:
            self.next[c] = self.store.completed(c.alpha, c.seed, c.param_dict)
            if self.next[c] >= self.G:
                clear_failure(self.store, c.alpha, c.seed, c.param_dict)
            else:
                pending.append(c)
        while True:
            self._share_generation_zero(pending)
            pending = [c for c in pending
                       if c not in self.outcome.failed and self.next[c] < self.G]
            ready = [c for c in pending if self.next[c] > 0 or self._leads(c, pending)]
            if not ready:
                return
            g = min(self.next[c] for c in ready)
            # Every round completes or fails each chain of the batch: the loop ends.
            self._generation([c for c in ready if self.next[c] == g], g)

    def _share_generation_zero(self, pending: list[ChainSpec]) -> None:
        """Chains still at generation 0 adopt it once any α of their (params, seed) has it."""
        for c in pending:
            if self.next[c] != 0:
                continue
            src = generation_zero_source(self.cfg, self.store, c.param_dict, c.seed)
            if src is not None:
                adopt_generation_zero_for(self.store, src, [c])
                self.next[c] = self.store.completed(c.alpha, c.seed, c.param_dict)
                # Reported like a computed cell (its copied timings), as the pool's driver does.
                report_new_cells(self.store, c, 0, min(1, self.next[c]), self.on_generation)

    def _leads(self, c: ChainSpec, pending: list[ChainSpec]) -> bool:
        """Generation 0 of a seed is computed by its first pending α only (the next α takes
        over when that one fails)."""
        if self.next[c] != 0:
            return False
        return next(o for o in pending if o.seed == c.seed and self.next[o] == 0) == c

    def _runner(self, c: ChainSpec):
        """The chain's runner, created when it first computes (after any adoption), so it
        resumes from the run directory as run_chain would."""
        if c not in self.runners:
            from .loop import ChainRunner

            log.info("%s: starting at generation %d", c.label(), self.next[c])
            self.runners[c] = ChainRunner(self.cfg, c.alpha, c.seed, self.store, c.param_dict,
                                          hooks=self.hooks)
        return self.runners[c]

    # ---- one generation of a batch ---------------------------------------------------------
    def _generation(self, batch: list[ChainSpec], g: int) -> None:
        items = []
        for c in batch:
            t = time.perf_counter()
            try:
                runner = self._runner(c)
                train, q_law = runner.prepare(g)
            except Exception as exc:
                self._fail(c, exc)
                continue
            items.append(_Item(c, runner, train, q_law, time.perf_counter() - t))
        for it in self._fit(items, g):
            try:
                seconds = it.runner.finish(g, it.train, it.q_law, it.score, it.state, it.seconds)
            except Exception as exc:  # e.g. NonFiniteSamples: nothing of the cell was written
                self._fail(it.chain, exc)
                continue
            self._done(it.chain, g, seconds)

    def _fit(self, items: list[_Item], g: int) -> list[_Item]:
        """Fit every item's score; returns the fitted items in their original order."""
        singles, batches = items, []
        if self.cfg.score.kind == "mlp":
            # One batched call per training-set shape; a lone chain is a batch of one, which
            # is exactly what fit_score does for an MLP.
            by_shape: dict[tuple, list[_Item]] = {}
            for it in items:
                by_shape.setdefault(tuple(it.train.x.shape), []).append(it)
            singles, batches = [], list(by_shape.values())
        fitted = []
        for it in singles:  # exactly as run_chain fits (the hooks called by the runner)
            t = time.perf_counter()
            try:
                it.score, it.state = it.runner.fit(g, it.train, it.q_law)
            except Exception as exc:
                self._fail(it.chain, exc)
                continue
            it.seconds += time.perf_counter() - t
            fitted.append(it)
        for grp in batches:
            fitted += self._fit_batched(grp, g)
        order = {id(it): n for n, it in enumerate(items)}
        return sorted(fitted, key=lambda it: order[id(it)])

    def _fit_batched(self, group: list[_Item], g: int) -> list[_Item]:
        from ..scores.training import TrainingDivergedError
        from .loop import fit_scores_batched

        live = []
        for it in group:
            try:
                if self.hooks:  # as ChainRunner.fit calls them for a fit of its own
                    self.hooks.at_fit(it.runner.ctx, g)
            except Exception as exc:
                self._fail(it.chain, exc)
                continue
            live.append(it)
        while live:
            t = time.perf_counter()
            try:
                fits = fit_scores_batched([it.runner.ctx for it in live], g,
                                          [it.train for it in live], threads=self.threads)
            except TrainingDivergedError as exc:
                k = getattr(exc, "chain", None)
                if k is None:  # not attributable to one chain: each of them failed
                    for it in live:
                        self._fail(it.chain, exc)
                    return []
                # Drop the diverged chain and fit the rest again: a chain's result does not
                # depend on which other chains share its batch.
                self._fail(live.pop(k).chain, exc)
                continue
            except Exception as exc:
                for it in live:
                    self._fail(it.chain, exc)
                return []
            # Each chain's fit time is its share of the batched call (the sum is the wall time).
            share = (time.perf_counter() - t) / len(live)
            log.info("generation %d: %d MLP nets fitted in one batched call (%.2fs)", g,
                     len(live), share * len(live))
            for it, (score, state) in zip(live, fits, strict=True):
                it.score, it.state = score, state
                it.seconds += share
            return live
        return []

    # ---- bookkeeping -----------------------------------------------------------------------
    def _done(self, c: ChainSpec, g: int, seconds: float) -> None:
        runner = self.runners[c]
        self.next[c] = runner.next
        if g == 0:
            self.outcome.gen0_trained += 1
        log.info("%s generation %d done in %.2fs", c.label(), g, seconds)
        if self.on_generation is not None:
            self.on_generation(c, g, seconds)
        if runner.done:
            clear_failure(self.store, c.alpha, c.seed, c.param_dict)
            log.info("%s: finished (%d generations computed)", c.label(), self.G - runner.start)
            del self.runners[c]  # its laws and data sets are not needed any more

    def _fail(self, c: ChainSpec, exc: BaseException) -> None:
        """Record the chain's failure as the other executors do and drop it from the lockstep."""
        error = f"{type(exc).__name__}: {exc}"
        trace = "".join(tb.format_exception(exc))
        reached = self.store.completed(c.alpha, c.seed, c.param_dict)
        self.outcome.failed[c] = record_failure(
            self.store, c.alpha, c.seed, c.param_dict, label=c.label(), generation=reached,
            error=error, traceback=trace)
        log.error("%s failed at generation %d: %s\n%s", c.label(), reached, error, trace)
        self.runners.pop(c, None)
