"""Run every chain of an experiment — in-process, in a process pool, on Ray, or in lockstep
with batched MLP training (``executor="batched"``, :mod:`collapselab.engine.lockstep`) — and
gather the results table, the summary over seeds and the failure records.

Results do not depend on the order or on the executor: each chain (and each generation) draws
from its own streams seeded by (seed, generation, purpose), and every chain writes its cells to
the shared run directory, from which results.parquet is collected in a fixed order.

Scheduling. One loop (:class:`Scheduler`) serves every executor: it dispatches the units of a
policy to a back-end and polls progress between waits. With :class:`PerChain` (local, pool, Ray)
a unit is one chain; with :class:`lockstep.Grouped` (batched) a unit is a part of whole
(params, seed) groups advanced in lockstep. Generation 0 trains on p alone, so it is the same
for every α of a (seed, swept params) group: with :class:`PerChain` the first α of each group
(the *leader*) runs first; as soon as its generation 0 is done, the other α adopt it
(:func:`loop.adopt_generation_zero`) and start from generation 1; a grouped part shares it
inside (every α of a group is in the same part).
Progress is observed by polling the run directory (metrics.json marks a finished generation),
which works the same for the in-process, pool and Ray executors.

Failures. A chain that raises, produces non-finite samples or whose worker dies is recorded in
its chain directory (failure.json: error, traceback, generation reached) and in DIR/failures.json;
the other chains go on; :class:`ChainFailed` is raised at the end. Re-running resumes every chain
after its last completed generation, so only what is missing is computed.
"""

from __future__ import annotations

import logging
import os
import time
import traceback as tb
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, build_config
from ..errors import ConfigError
from .chains import (  # noqa: F401  (re-exported: the names every driver shares)
    POLL_SECONDS,
    ChainSpec,
    WorkerPool,
    adopt_generation_zero_for,
    generation_zero_source,
    report_new_cells,
)
from .chains import died as _died
from .hooks import Hooks
from .store import (
    RunStore,
    atomic_write_json,
    atomic_write_text,
    cell_name,
    clear_failure,
    failures,
    read_json,
    record_failure,
    remove_stale_temporaries,
    run_lock,
    write_summary,
)

log = logging.getLogger("collapselab")

EXECUTORS = ("local", "ray", "batched")
@dataclass(frozen=True)
class Resources:
    """What each chain asks the scheduler for (Ray); ``num_gpus`` may be fractional (0.25 lets
    four small chains share one GPU). The pool always gives one CPU thread per worker."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


def chains(cfg: Config) -> list[ChainSpec]:
    """Every chain of the sweep, in a fixed order (swept keys, then α, then seed)."""
    return [
        ChainSpec(a, s, tuple(p.items()))
        for p in cfg.sweep.combinations()
        for a in cfg.sweep.alphas
        for s in cfg.sweep.seeds
    ]


def check_cell_names(cfg: Config) -> None:
    """Every swept value gets a cell of its own: a value given twice, or two values whose
    cell names would coincide (:func:`store.cell_name`), is refused naming both."""
    groups = [("sweep.alphas", "alpha", [float(a) for a in cfg.sweep.alphas]),
              ("sweep.seeds", "seed", [int(s) for s in cfg.sweep.seeds])]
    groups += [(f"sweep.{k}", k, list(v)) for k, v in cfg.sweep.grid.items()]
    for field, key, values in groups:
        seen: dict[str, object] = {}
        for v in values:
            name = cell_name(v)
            if name in seen:
                other = seen[name]
                what = (f"{v!r} is given twice" if type(other) is type(v) and other == v else
                        f"{other!r} and {v!r} would share the cell {key}={name}")
                raise ConfigError(field, f"{what}; give distinct values")
            seen[name] = v


def check_out(out: Path) -> None:
    """--out must be (or be creatable as) a directory this process can write in: say so
    before anything is computed or written."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError("--out", f"{out} exists and is not a directory")
        where = out
    else:
        where = out.absolute().parent
        while not where.exists() and not where.is_symlink() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise ConfigError("--out", f"{out}: {where} is not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError("--out", f"{out}: cannot write in {where} (permission denied or a "
                                   "read-only filesystem); choose another --out")


def check_device(cfg: Config, executor: str = "local", address: str | None = None) -> None:
    """``device: cuda[:N]`` needs CUDA (and device N) where the chains run: here, unless they
    run on a Ray cluster given by ``address``."""
    if not cfg.device.startswith("cuda") or (executor == "ray" and address):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device", f"{cfg.device}: CUDA is not available on this machine "
                                    "(torch.cuda.is_available() is False); use device=cpu")
    index = cfg.device.partition(":")[2]
    n = torch.cuda.device_count()
    if index and int(index) >= n:
        raise ConfigError("device", f"{cfg.device}: this machine has {n} CUDA device(s) "
                                    f"(allowed: cuda, cuda:0 … cuda:{n - 1})")


def _has_completed_cells(store: RunStore) -> bool:
    cells = store.root / "cells"
    return cells.exists() and next(cells.rglob("metrics.json"), None) is not None


def _open_run_dir(cfg: Config, store: RunStore) -> None:
    """Under the run directory's lock: write config.yaml, or check that the one there is
    this configuration's. A directory without a completed cell holds nothing to protect: its
    config.yaml (even a damaged one, e.g. of a run that stopped before computing) is replaced."""
    meta = {"name", "description", "notes"}
    if store.config_path.exists():
        reason = None
        try:
            old = build_config(yaml.safe_load(store.config_path.read_text()))
            if old.model_dump(exclude=meta) != cfg.model_dump(exclude=meta):
                reason = "holds a run with a different configuration"
        except (ConfigError, yaml.YAMLError, UnicodeDecodeError, TypeError, ValueError, OSError):
            reason = "has a damaged config.yaml"
        if reason is None:
            return
        if _has_completed_cells(store):
            raise ConfigError("--out", f"{store.root} {reason}; choose a new --out")
        log.info("%s %s and no completed cell: replaced", store.root, reason)
    atomic_write_text(store.config_path, cfg.dump())


def _migrate_legacy_cells(cfg: Config, store: RunStore) -> None:
    """Rename chain directories of earlier versions (swept values by ``fmt_key``: floats
    rounded to 12 digits, other values unescaped) to their :func:`store.cell_name` names, so
    that such runs resume; only where the old name belongs to exactly one chain."""
    specs = chains(cfg)
    new = {c: store.chain_dir(c.alpha, c.seed, c.param_dict) for c in specs}
    old = {c: store.legacy_chain_dir(c.alpha, c.seed, c.param_dict) for c in specs}
    count: dict[Path, int] = {}
    for p in old.values():
        count[p] = count.get(p, 0) + 1
    taken = set(new.values())
    for c in specs:
        src, dst = old[c], new[c]
        if (src is None or src == dst or count[src] > 1 or src in taken or not src.is_dir()
                or dst.exists()):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        log.info("%s: cells renamed from %s", c.label(), src.relative_to(store.root))


def prepare_run_dir(cfg: Config, out: Path) -> RunStore:
    """Create (or reopen for resuming) a run directory; refuses one of another config, one that
    another process is using (:func:`store.run_lock`) and an unusable --out, before writing; a
    plug-in model that cannot be found or breaks the contract too
    (:func:`~collapselab.scores.registry.check_model`)."""
    from ..scores.registry import check_model

    check_model(cfg)
    check_cell_names(cfg)
    check_out(out)
    store = RunStore(out)
    try:
        with run_lock(store.root):
            _open_run_dir(cfg, store)
            _migrate_legacy_cells(cfg, store)
    except OSError as exc:
        raise ConfigError("--out", f"{out}: {exc.strerror or exc}") from None
    return store


def verify_run_dir(cfg: Config, store: RunStore) -> dict[ChainSpec, int]:
    """Check every chain's completed cells (sizes and SHA-256 recorded in metrics.json);
    a damaged generation and the rest of its chain are un-completed, to be recomputed."""
    return {c: store.verify_chain(c.alpha, c.seed, c.param_dict, label=c.label())
            for c in chains(cfg)}


class ChainFailed(RuntimeError):
    """One or more chains failed; the message is one line naming the first one."""

    def __init__(self, chain: ChainSpec, generation, log_path, cause, others: int = 0):
        self.chain, self.generation, self.others = chain, generation, others
        more = f"; {others} more chain(s) failed, see failures.json" if others else ""
        cause = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"chain {chain.label()} failed at generation {generation}: "
            f"{_one_line(cause)} (log: {log_path}){more}"
        )


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- the worker side: one chain, in any process on any machine ----------------------------
def execute_chain(cfg_data: dict, root: str, alpha: float, seed: int, params: dict,
                  hooks: dict | None = None, threads: int | None = None,
                  on_generation: Callable[[int, float], None] | None = None) -> dict:
    """Run (or resume) one chain and report how it went; never raises for a chain's failure.

    The entry point of every executor (in-process, pool worker, Ray task): plain arguments, a
    plain dict back — ``ok``, ``start`` (generations done before), ``computed``, and on failure
    ``error`` / ``traceback``. ``hooks``: the test hooks as plain data (:meth:`Hooks.as_dict`).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    cfg = build_config(cfg_data)
    store = RunStore(Path(root))
    start = store.completed(alpha, seed, params)
    t0 = time.perf_counter()

    def guarded(generation: int, seconds: float):
        if on_generation is not None:
            on_generation(generation, seconds)

    try:
        from .loop import run_chain  # torch loads here, after the input is validated

        computed = run_chain(cfg, alpha, seed, store, on_generation=guarded, params=params,
                             hooks=Hooks.from_dict(hooks))
    except Exception as exc:  # the chain's failure is data for the driver, not a crash
        done = store.completed(alpha, seed, params)
        return {"ok": False, "start": start, "computed": done - start,
                "error": f"{type(exc).__name__}: {exc}", "traceback": tb.format_exc(),
                "seconds": time.perf_counter() - t0}
    return {"ok": True, "start": start, "computed": computed, "seconds": time.perf_counter() - t0}


# ---- back-ends: submit(task_id, kwargs), wait(timeout) -> [(task_id, result)], close() --------
class _InProcess:
    """Units one after another in this process (a task is ``{"entry": function, **its keyword
    arguments}``, as for :class:`chains.WorkerPool`); progress is reported from inside each."""

    capacity = 1

    def __init__(self):
        self.queue = deque()

    def submit(self, task_id, kwargs):
        self.queue.append((task_id, kwargs))

    def wait(self, timeout):
        if not self.queue:
            return []
        task_id, kwargs = self.queue.popleft()
        kwargs = dict(kwargs)
        return [(task_id, kwargs.pop("entry")(**kwargs))]

    def close(self):
        pass


class _Ray:
    """One Ray task per chain with the given resources; a local Ray is started (and shut down)
    for the run when no address is given. Ray does not retry a chain (max_retries=0): a crash
    is recorded like any failure and the re-run resumes it."""

    def __init__(self, address: str | None, workers: int, resources: Resources):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor", "ray is not installed (pip install "
                              "'collapselab[ray]')") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, num_gpus=None, include_dashboard=False,
                         log_to_driver=False)
        self.capacity = 1 << 30  # Ray queues by resources; keep every ready chain submitted
        self.remote = ray.remote(execute_chain).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=0
        )
        self.threads = max(1, int(resources.num_cpus))
        self.refs: dict = {}

    def submit(self, task_id, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "entry"}  # always execute_chain
        self.refs[self.remote.remote(**{**kwargs, "threads": self.threads})] = task_id

    def wait(self, timeout):
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        out = []
        for ref in ready:
            task_id = self.refs.pop(ref)
            try:
                out.append((task_id, self.ray.get(ref)))
            except Exception as exc:  # a crashed worker or node: recorded, not raised
                out.append((task_id, _died(f"ray task failed: {_one_line(type(exc).__name__)}: "
                                           f"{_one_line(str(exc), 200)}")))
        return out

    def close(self):
        for ref in list(self.refs):
            self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()


# ---- the scheduler -----------------------------------------------------------------------------
class Scheduler:
    """The one scheduling loop of every executor: hand the policy's ready units to the back-end
    (in-process, spawned pool, Ray) up to its capacity, give each result back to the policy,
    poll progress between waits, close the back-end, then close the policy (which settles its
    failure records and counts).

    A policy has ``ready`` (a deque of units), ``running`` (a set), ``starting(unit)``,
    ``task(unit)`` (``{"entry": function, **keyword arguments}``), ``finished(unit, result)``,
    ``poll()``, ``close()``, and after closing ``failed`` ({ChainSpec: failure record}) and
    ``gen0_trained``: :class:`PerChain` (a unit is one chain; generation 0 shared across α by
    leaders and followers) or :class:`lockstep.Grouped` (a unit is a part of whole (params,
    seed) groups advanced in lockstep).
    """

    def __init__(self, policy):
        self.policy = policy

    def run(self, backend) -> None:
        p = self.policy
        units: dict[int, object] = {}
        try:
            while p.ready or p.running:
                while p.ready and len(p.running) < backend.capacity:
                    u = p.ready.popleft()
                    p.running.add(u)
                    units[len(units)] = u
                    p.starting(u)
                    backend.submit(len(units) - 1, p.task(u))
                for task_id, result in backend.wait(POLL_SECONDS):
                    p.finished(units[task_id], result)
                p.poll()
        finally:
            backend.close()
        p.close()


class PerChain:
    """The policy of the local, pool and Ray executors: a unit is one chain
    (:func:`execute_chain`); the leader of each (params, seed) group runs first and the other
    α adopt its generation 0 once done (module docstring)."""

    def __init__(self, cfg: Config, store: RunStore, on_generation, hooks: dict, *,
                 in_process: bool = False):
        self.cfg, self.store, self.on_generation = cfg, store, on_generation
        self.in_process = in_process
        self.G = cfg.loop.generations
        self.cfg_data = cfg.model_dump(mode="json")
        self.hooks = hooks
        self.seen: dict[ChainSpec, int] = {}
        self.initial: dict[ChainSpec, int] = {}
        self.running: set[ChainSpec] = set()
        self.ready: deque[ChainSpec] = deque()
        self.leader: dict[tuple, ChainSpec] = {}
        self.followers: dict[tuple, list[ChainSpec]] = {}
        self.failed: dict[ChainSpec, dict] = {}
        self.gen0_trained = 0

    @staticmethod
    def group(c: ChainSpec) -> tuple:
        return (c.params, c.seed)

    def task(self, c: ChainSpec) -> dict:
        task = dict(entry=execute_chain, cfg_data=self.cfg_data, root=str(self.store.root),
                    alpha=c.alpha, seed=c.seed, params=c.param_dict, hooks=self.hooks)
        if self.in_process:  # progress polled from inside the chain
            task["on_generation"] = lambda g, s: self.poll()
        return task

    def starting(self, c: ChainSpec) -> None:
        log.info("%s: starting at generation %d", c.label(), self.seen[c])

    def close(self) -> None:
        pass

    def plan(self, specs: list[ChainSpec]) -> None:
        """Leaders first (their generation 0 unblocks the rest), then chains that can start."""
        groups: dict[tuple, list[ChainSpec]] = {}
        for c in specs:
            self.seen[c] = self.store.completed(c.alpha, c.seed, c.param_dict)
            self.initial[c] = self.seen[c]
            if self.seen[c] >= self.G:
                clear_failure(self.store, c.alpha, c.seed, c.param_dict)
                continue
            groups.setdefault(self.group(c), []).append(c)
        later = []
        for key, members in groups.items():
            src = self._gen0_source(key, members)
            if src is not None:
                self._adopt(src, members)
                later.extend(members)
            else:
                self.ready.append(members[0])
                self.leader[key] = members[0]
                self.followers[key] = members[1:]
        self.ready.extend(later)

    def _gen0_source(self, key, members) -> float | None:
        return generation_zero_source(self.cfg, self.store, dict(key[0]), key[1])

    def _adopt(self, src_alpha: float, members: list[ChainSpec]) -> None:
        adopt_generation_zero_for(self.store, src_alpha, members)

    def poll(self) -> None:
        """Report newly finished generations; release followers once a leader's gen 0 is done."""
        for c in list(self.running):
            self.seen[c] = report_new_cells(self.store, c, self.seen[c], self.G,
                                            self.on_generation)
            key = self.group(c)
            if self.leader.get(key) == c and self.seen[c] >= 1:
                self._release(key, c.alpha)

    def _release(self, key, src_alpha: float) -> None:
        members = self.followers.pop(key, [])
        self.leader.pop(key, None)
        self._adopt(src_alpha, members)
        self.ready.extend(members)

    def finished(self, c: ChainSpec, result: dict) -> None:
        self.running.discard(c)
        self.poll_one(c)
        cell0 = self.store.cell(c.alpha, c.seed, 0, c.param_dict) / "metrics.json"
        if self.initial[c] == 0 and cell0.exists() and "shared_from_alpha" not in read_json(cell0):
            self.gen0_trained += 1
        if result["ok"]:
            clear_failure(self.store, c.alpha, c.seed, c.param_dict)
            log.info("%s: finished (%d generations computed)", c.label(), result["computed"])
            return
        reached = self.store.completed(c.alpha, c.seed, c.param_dict)
        rec = record_failure(self.store, c.alpha, c.seed, c.param_dict, label=c.label(),
                             generation=reached, error=result["error"],
                             traceback=result.get("traceback", ""))
        self.failed[c] = rec
        log.error("%s failed at generation %d: %s\n%s", c.label(), reached, result["error"],
                  result.get("traceback", ""))
        key = self.group(c)
        if self.leader.get(key) == c:
            # Generation 0 never finished: the next α of the group computes it itself.
            members = self.followers.get(key, [])
            if members:
                self.leader[key], self.followers[key] = members[0], members[1:]
                self.ready.append(members[0])
            else:
                self.leader.pop(key, None)

    def poll_one(self, c: ChainSpec) -> None:
        self.running.add(c)
        self.poll()
        self.running.discard(c)


def run_experiment(
    cfg: Config,
    store: RunStore,
    on_generation: Callable[[ChainSpec, int, float], None] | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    resources: Resources | None = None,
    stats: dict | None = None,
    hooks: Hooks | None = None,
):
    """Run or resume every chain, then write results.parquet and summary.{parquet,csv}.

    executor: ``local`` — in this process when ``workers`` is 1 (the default), else a pool of
        ``workers`` spawned processes with one torch thread each; ``ray`` — one Ray task per
        chain on the cluster at ``address`` (``auto``, ``ray://host:10001``) or on a local Ray
        started for the run with ``workers`` CPUs (default: all cores); ``batched`` — the
        chains of each group (same swept keys other than α and seed) advanced in lockstep with
        their MLP nets of a generation trained in one batched call
        (:mod:`collapselab.engine.lockstep`),
        on ``workers`` cores (default: all): the (swept keys, seed) groups dealt over
        min(workers, groups) spawned processes with workers // processes threads each, or in
        this process with ``workers`` threads when there is one part.
    resources: what each Ray task asks for (default 1 CPU, and 1 GPU when ``cfg.device`` is
        cuda; fractional GPUs allowed).
    stats: filled with ``generation_zero_trained`` (chains that computed generation 0 now) and
        ``failed`` (labels of failed chains).
    hooks: test hooks (:class:`collapselab.engine.hooks.Hooks`: injected faults, a log of the
        fits), passed to every chain's worker and called before each score fit.
    Returns the results table; raises :class:`ChainFailed` after every other chain has finished
    when one or more chains failed (results.parquet then holds what was completed).
    """
    if executor not in EXECUTORS:
        raise ConfigError("--executor", f"allowed values are {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ConfigError("--workers", "must be a positive integer")
    if executor == "batched" and address is not None:
        raise ConfigError("--address", "only used with --executor ray")
    if executor == "batched" and workers is None:
        workers = os.cpu_count() or 1  # cores shared by its processes
    if resources is None:
        resources = Resources(num_gpus=1.0 if cfg.device.startswith("cuda") else 0.0)
    check_cell_names(cfg)
    check_device(cfg, executor, address)
    with run_lock(store.root):
        return _run_locked(cfg, store, on_generation, executor=executor, workers=workers,
                           address=address, resources=resources, stats=stats,
                           hooks=hooks.as_dict() if hooks else {})


def _run_locked(cfg, store, on_generation, *, executor, workers, address, resources, stats,
                hooks):
    """run_experiment's body, with the run directory's lock held."""
    _open_run_dir(cfg, store)
    _migrate_legacy_cells(cfg, store)
    removed = remove_stale_temporaries(store.root)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    verify_run_dir(cfg, store)
    from ..environment import environment

    atomic_write_json(store.root / "environment.json",
                      {**environment(), "device": cfg.device, "executor": executor,
                       "workers": workers or 1, "address": address,
                       "resources_per_chain": vars(resources)})
    if executor == "batched":
        from .lockstep import grouped

        policy = grouped(cfg, store, chains(cfg), on_generation, hooks, workers=workers)
        backend = (_InProcess() if policy.in_process else
                   WorkerPool(len(policy.ready), task="its part of the batched executor"))
    else:
        in_process = executor == "local" and (workers or 1) <= 1
        policy = PerChain(cfg, store, on_generation, hooks, in_process=in_process)
        policy.plan(chains(cfg))
        if executor == "ray":
            backend = _Ray(address, workers or os.cpu_count() or 1, resources)
        elif not in_process:
            backend = WorkerPool(workers)
        else:
            backend = _InProcess()
    Scheduler(policy).run(backend)
    failed, gen0_trained = policy.failed, policy.gen0_trained
    df = store.write_results([store.chain_dir(c.alpha, c.seed, c.param_dict)
                              for c in chains(cfg)])
    write_summary(store, df)
    recs = failures(store)
    if recs:
        atomic_write_json(store.root / "failures.json", recs)
    else:
        (store.root / "failures.json").unlink(missing_ok=True)
    if stats is not None:
        stats.update(generation_zero_trained=gen0_trained,
                     failed=[c.label() for c in failed])
    if failed:
        first, rec = next(iter(failed.items()))
        raise ChainFailed(first, rec["generation"], store.log_path, rec["error"],
                          others=len(failed) - 1)
    return df


def default_out(cfg: Config) -> Path:
    return Path("runs") / cfg.name
