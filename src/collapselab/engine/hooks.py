"""Test hooks called at every score fit: an injected fault and a log of the fits.

A :class:`Hooks` is passed explicitly — ``run_experiment(..., hooks=Hooks(...))`` — and
travels to the workers as plain data (:meth:`Hooks.as_dict`); :meth:`ChainRunner.fit
<collapselab.engine.loop.ChainRunner.fit>` and the batched executor call :meth:`Hooks.at_fit`
just before a chain's fit. Nothing is patched: a run without hooks is untouched by them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

FAULT_KINDS = ("exit", "raise", "nan")


@dataclass(frozen=True)
class Hooks:
    """What to do at the score fits of a run (documented in docs/distributed.md).

    faults: ``{"alpha", "seed", "generation", "kind"}`` dicts; the fit of that chain's
        generation fails: ``exit`` kills the process running it (``os._exit(17)``: no
        cleanup, no exception), ``raise`` raises ``RuntimeError``, ``nan`` raises
        ``TrainingDivergedError`` as a diverged loss would (``kind`` defaults to ``raise``).
    fit_log: a file to which every fit appends ``alpha seed generation params`` (one line,
        O_APPEND): what was actually trained, in whatever process trained it.
    """

    faults: tuple = ()
    fit_log: str | None = None

    def __post_init__(self):
        faults = self.faults
        faults = [faults] if isinstance(faults, dict) else list(faults or ())
        for f in faults:
            missing = [k for k in ("alpha", "seed", "generation") if k not in f]
            if missing:
                raise ValueError(f"fault {f!r} lacks {', '.join(missing)}")
            if f.get("kind", "raise") not in FAULT_KINDS:
                raise ValueError(f"fault kind {f.get('kind')!r}: allowed values are "
                                 f"{', '.join(FAULT_KINDS)}")
        object.__setattr__(self, "faults", tuple(dict(f) for f in faults))
        if self.fit_log is not None:
            object.__setattr__(self, "fit_log", str(self.fit_log))

    def __bool__(self) -> bool:
        return bool(self.faults or self.fit_log)

    def with_faults(self, *faults: dict) -> Hooks:
        """These hooks with ``faults`` injected (the fit log kept)."""
        return replace(self, faults=faults)

    def as_dict(self) -> dict:
        """Plain data for a worker (a pipe, a Ray task); :meth:`from_dict` inverts it."""
        return {"faults": [dict(f) for f in self.faults], "fit_log": self.fit_log}

    @classmethod
    def from_dict(cls, data: dict | None) -> Hooks:
        data = data or {}
        return cls(faults=tuple(data.get("faults") or ()), fit_log=data.get("fit_log"))

    def at_fit(self, ctx, generation: int) -> None:
        """Called just before chain ``ctx``'s (a :class:`loop.ChainContext`) score fit of
        ``generation``: inject the fault configured for (α, seed, generation), then log the
        fit."""
        for f in self.faults:
            if (float(f["alpha"]) == float(ctx.alpha) and int(f["seed"]) == int(ctx.seed)
                    and int(f["generation"]) == generation):
                _fault(f.get("kind", "raise"), generation)
        if self.fit_log:
            with open(self.fit_log, "a") as f:  # O_APPEND: one short line per fit
                f.write(f"{float(ctx.alpha)!r} {int(ctx.seed)} {generation} "
                        f"{json.dumps(ctx.params)}\n")


def _fault(kind: str, generation: int):
    if kind == "exit":
        os._exit(17)  # a killed worker: no cleanup, no exception, files of this generation absent
    if kind == "nan":
        from ..scores.training import TrainingDivergedError

        raise TrainingDivergedError(1, float("nan"))
    raise RuntimeError(f"injected fault at generation {generation}")
