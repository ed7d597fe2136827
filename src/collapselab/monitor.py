"""Measure a recursive-retraining run whose training loop is yours (docs/plugins.md).

Give the target p (a law: ``sample(n, generator)``, ``log_prob(x)``, ``dim``) and, after each
generation i of your loop, the draws of p̂_{i+1} (and when you have them: the model's law, its
training set, its score). :class:`Monitor` computes the rows the loop computes — D_{i+1} =
χ²(p̂_{i+1}‖p) and I_i = χ²(p̂_{i+1}‖q_i) with their KL twins (docs/paper.md §3), ε⋆,i² and the
single-generation bound checks of docs/paper.md §4 — and appends them to a run directory of the
usual layout, which ``collapselab report DIR`` renders.

Estimators, as in the loop: exact-density Monte Carlo when the model's law is given (it must
sample and have ``log_prob``); otherwise the kNN KL with p's known density and the classifier
χ²/KL from samples. q_i is taken to be the fresh-data mixture α p + (1 − α) p̂_i (the
``fresh_mixture`` policy; q_0 = p) unless its law is passed; I_i from training samples when no
law of q_i is known. ε⋆,i² and the bounds need a score and a q_i whose noised scores are exact
(q_0 = p for a Gaussian-mixture target; later generations when p̂_i's law is a mixture too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import build_config
from .engine.store import (
    RunStore,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    write_summary,
)
from .measure import estimators as est
from .measure.estimate import Estimate
from .processes import OU
from .scores.registry import ModelLaw
from .targets import LawMixture, mix_laws
from .verdicts import render_check


def _has_marginals(law) -> bool:
    if isinstance(law, LawMixture):
        return all(_has_marginals(p) for p in law.laws)
    return callable(getattr(law, "marginal", None))


class Monitor:
    """Rows of D_i, I_i, ε⋆², bounds for generations you train yourself, in run directory
    ``out`` (created; a second Monitor on the same directory continues it).

    alpha, seed: the fresh-data fraction and the seed your loop uses (the run's α and seed
        columns). process, t0, T: the forward process your model's score refers to and where
        sampling stops (defaults: the paper's OU process, T = 4, t0 = 0.02): ε⋆² integrates
        over [t0, T], and the bounds compare with q_i pushed to t0.
    n_mc, n_eval: exact-density draws and sample-based evaluation points per estimate.
    n_times, n_mc_path: quadrature nodes and draws per node of ε⋆².
    i0, C, c: the bound checks' transient and constants (docs/paper.md §4).
    """

    def __init__(self, out, target, *, alpha: float, seed: int = 0, process=None,
                 t0: float = 0.02, n_mc: int = 20000, n_eval: int = 2000, n_times: int = 20,
                 n_mc_path: int = 500, i0: int = 0, C: float = 0.0, c: float = 0.0,
                 name: str = "monitor"):
        self.store = RunStore(Path(out))
        self.target, self.alpha, self.seed = target, float(alpha), int(seed)
        self.process = process if process is not None else OU(T=4.0)
        self.t0, self.n_mc, self.n_eval = float(t0), int(n_mc), int(n_eval)
        self.n_times, self.n_mc_path = int(n_times), int(n_mc_path)
        self.i0, self.C, self.c, self.name = int(i0), float(C), float(c), name
        self.laws: dict[int, object] = {}  # p̂_g's law, when given

    # -- rows -------------------------------------------------------------------------------
    def _row(self, generation: int, metric: str, e: Estimate) -> dict:
        return {"alpha": self.alpha, "seed": self.seed, "generation": int(generation),
                "metric": metric, **e.as_row()}

    def _generator(self, generation: int, purpose: int) -> tuple[torch.Generator, int]:
        ss = np.random.SeedSequence([self.seed, generation, purpose])
        s = int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))
        return torch.Generator().manual_seed(s), s % (2**31)

    def training_law(self, generation: int):
        """q_i = α p + (1 − α) p̂_i (q_0 = p), or None when p̂_i's law was not given."""
        if generation == 0:
            return self.target
        law = self.laws.get(generation)
        return None if law is None else mix_laws([(self.alpha, self.target),
                                                  (1 - self.alpha, law)])

    def record(self, generation: int, samples, *, law=None, train=None, train_law=None,
               score=None) -> list[dict]:
        """Measure generation i (its model's draws of p̂_{i+1}: ``samples``, shape (n, d)) and
        append the rows to the run directory. ``law``: p̂_{i+1}'s exact law (a Law, or a
        model with ``sample(n, *, generator)`` and ``log_prob``);
        ``train``: q_i's training set; ``train_law``: q_i's law (default: see
        :meth:`training_law`); ``score``: the model's score ``score(x, t)``, for ε⋆². Returns
        the rows written."""
        from . import theory
        from .measure import pathwise as pw

        i, nxt = int(generation), int(generation) + 1
        x = torch.as_tensor(np.asarray(samples), dtype=torch.float64).reshape(len(samples), -1)
        if not torch.isfinite(x).all():
            raise ValueError(f"generation {i}: samples contain NaN/Inf")
        gen, seed = self._generator(i, 5)
        q = train_law if train_law is not None else self.training_law(i)
        if law is not None and not hasattr(law, "dim"):  # a plug-in model: sample + log_prob
            law = ModelLaw(law, (x.shape[1],))
        if law is not None:
            self.laws[nxt] = law
        rows = []
        if i == 0:
            zero = Estimate(0.0, 0.0, "exact", "p̂_0 = p by convention")
            rows += [self._row(0, "accumulated_chi2", zero), self._row(0, "accumulated_kl", zero)]
        if law is not None:
            for key, e in est.mc_divergences(law, self.target, self.n_mc, gen).items():
                rows.append(self._row(nxt, f"accumulated_{key}", e))
            if q is not None:
                for key, e in est.mc_divergences(law, q, self.n_mc, gen).items():
                    rows.append(self._row(i, f"intra_{key}", e))
                if score is not None and _has_marginals(q):  # what the bounds compare with
                    q_t0 = q.marginal(self.process, self.t0)
                    for key, e in est.mc_divergences(law, q_t0, self.n_mc, gen).items():
                        rows.append(self._row(i, f"intra_{key}_t0", e))
        rng = np.random.default_rng(seed)
        xe = x[rng.choice(len(x), min(self.n_eval, len(x)), replace=False)].numpy()
        real = self.target.sample(len(xe), gen).reshape(len(xe), -1).double().numpy()
        rows.append(self._row(nxt, "accumulated_kl", est.knn_kl_known_b(xe, self.target.log_prob)))
        d = est.classifier_divergences(xe, real, seed=seed)
        if law is None:
            rows.append(self._row(nxt, "accumulated_chi2", d["chi2"]))
        if q is not None:
            rows.append(self._row(i, "intra_kl", est.knn_kl_known_b(xe, q.log_prob)))
        elif train is not None:
            tr = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
            tr = tr[rng.choice(len(tr), min(self.n_eval, len(tr)), replace=False)]
            rows.append(self._row(i, "intra_kl", est.knn_kl(xe, tr)))
            rows.append(self._row(i, "intra_chi2",
                                  est.classifier_divergences(xe, tr, seed=seed)["chi2"]))
        rows += self._pathwise(i, score, q, rows, pw, theory)
        self._write(i, rows, x, train)
        return rows

    def _pathwise(self, i, score, q, rows, pw, theory) -> list[dict]:
        """ε⋆,i² (Simpson quadrature over [t0, T]) and the bound checks against the measured
        I_i of q_i pushed to t0 (docs/paper.md §4), when a score and q_i's noised scores exist."""
        if score is None or q is None or not _has_marginals(q):
            return []
        gen, _ = self._generator(i, 7)
        T = self.process.T
        e = pw.score_energy_ideal(score, q, self.process, self.t0, T, self.n_times,
                                  self.n_mc_path, gen)
        out = [self._row(i, "score_energy_ideal", e)]
        vals = {"eps_star_sq": e.value, "eps_star_sq_stderr": e.stderr}
        for r in rows:
            if r["generation"] == i and r["metric"] in ("intra_kl_t0", "intra_chi2_t0"):
                key = r["metric"][: -len("_t0")]
                vals[key], vals[key + "_stderr"] = r["value"], r["stderr"]
        for chk in theory.check_single_generation(generation=i, i0=self.i0, C=self.C, c=self.c,
                                                  **vals):
            row = self._row(i, chk.name, Estimate(chk.bound, chk.bound_stderr, "theory",
                                                  render_check(chk)))
            row["held"], row["measured"] = chk.held, chk.measured
            row["status"], row["cause"] = chk.status.value, chk.cause.value
            out.append(row)
        return out

    # -- the run directory --------------------------------------------------------------------
    def _write(self, i: int, rows: list[dict], x: torch.Tensor, train) -> None:
        cell = self.store.cell(self.alpha, self.seed, i)
        atomic_save_npy(cell / "samples.npy", x.float().numpy())
        if train is not None:
            atomic_save_npy(cell / "train.npy", np.asarray(train, dtype=np.float32))
        atomic_write_json(cell / "metrics.json", {"rows": rows, "timings": {}})
        generations = self.store.completed(self.alpha, self.seed)
        cfg = build_config({
            "name": self.name,
            "description": "measured by collapselab.monitor (the user's own training loop and "
                           "target)",
            "process": self._process_config(),
            "sampler": {"t0": self.t0},
            "loop": {"generations": max(1, generations)},
            "pathwise": {"i0": self.i0, "C": self.C, "c": self.c},
            "sweep": {"alphas": [self.alpha], "seeds": [self.seed]},
        })
        atomic_write_text(self.store.config_path, cfg.dump())
        write_summary(self.store, self.store.write_results())

    def _process_config(self) -> dict:
        p = self.process
        if isinstance(p, OU):
            return {"kind": "ou", "T": float(p.T)}
        return {"kind": "vp", "T": float(p.T), "beta_min": float(p.beta_min),
                "beta_max": float(p.beta_max)}
