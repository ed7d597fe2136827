"""The observability experiment (docs/paper.md §3, §5; the paper's Fig. 2): η for injected errors.

``collapselab run observability`` measures the observability coefficient

    η = Var(E[M_T | Y_t0]) / ε⋆²,      M_T = −∫_{t0}^{T} √β e(Y_t, t) · dB̄_t,

for three kinds of injected score error e = c·e₁ (:mod:`collapselab.scores.perturbed`) across
magnitudes c and seeds, on base processes treated as the *ideal* reverse process:

- ``gmm``: a centred two-component Gaussian mixture in d dimensions (means ±sep·e₁, isotropic
  std): nearly isotropic. Its exact score is the ideal score.
- ``paper_gmm``: the paper's GMM layout (docs/paper.md §5: origin + (±4, ±4, 0, …), std 0.6), very
  anisotropic. Its exact score is the ideal score.
- ``digits``: sklearn's 8×8 digits flattened to 64 dimensions, scaled to [−1, 1]; the base is an
  MLP ε-network trained briefly by denoising score matching. The *base model* is the ideal
  process here (nothing else is available): η measures how visible an error added to that
  model is in its own samples, not an error against the true data score.

Error kinds (magnitude c, e₁ of unit mean-square size for a unit-variance state):
``aligned`` e₁ = y (aligned with the drift ½y); ``random_linear`` e₁ = A y with a random A of
Frobenius norm √d drawn per seed; ``time_oscillating`` e₁ = √2 cos(2πft)·u with u = (1, …, 1):
a *fast-oscillating* time-only error, the case where η ≈ 0. A constant or smooth ξ(t)
(``time_constant``) is **observable** (η ≈ 0.5 on a Gaussian: a drift offset moves the output
mean), see :mod:`collapselab.measure.pathwise`; docs/paper.md's "time-only ⇒ η ≈ 0" holds only for
ξ that
oscillates faster than the response kernel varies.

Method. For each (target, magnitude, seed) the ideal reverse SDE is simulated with
Euler–Maruyama (``paths.steps`` steps from T to t0, ``paths.n_paths`` paths; the GMM paths start
from q_T exactly, digits from N(0, I)), and M_T of every error kind is accumulated with the very
Brownian increments that drive the paths. η is the cross-fitted regression estimate of
:func:`collapselab.measure.pathwise.observability` (denominator Var(M_T) of the same paths);
ε⋆² is exact for the GMMs (closed-form E‖W y + b‖² and adaptive quadrature) and the mean path
quadratic variation Σ β‖e‖²Δt for digits. Since the ideal paths do not depend on the error and
e = c·e₁ gives M_T = c·M₁, η does not depend on c *by construction*: each magnitude uses fresh
paths, so the magnitude axis is a set of independent replicates that checks the estimator
(while ε⋆² ∝ c²).

Regressors: ``poly2`` (GMMs: contains E[M|Y] exactly for a Gaussian law and affine errors);
``pca_quadratic`` (digits: PCA coordinates of Y, all their squares and the full quadratic in the
leading ``pca_full`` components, then ridge; a restricted regressor can only under-estimate η,
so the digits η are conservative); or any of :data:`collapselab.measure.pathwise.REGRESSORS` /
``auto``.

Run directory: DIR/config.yaml (resolved), DIR/cells/target=<t>/magnitude=<c>/seed=<s>/
metrics.json (written last, atomically: a killed run resumes), DIR/results.parquet (columns
alpha = NaN, seed, generation = 0, metric ∈ {observability, score_energy_ideal,
regression_r2_oos}, estimator, value, stderr, note, target, error_type, magnitude),
DIR/observability_summary.csv, DIR/figures/*.png, DIR/report.html (the last three written by
:mod:`collapselab.report.observability`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..measure.estimate import Estimate

EXPERIMENTS = ("observability",)
TARGETS = ("gmm", "paper_gmm", "digits")
ERROR_TYPES = ("aligned", "random_linear", "time_oscillating", "time_constant")
ORDER = ("aligned", "random_linear", "time_oscillating")  # the paper's Fig. 2 ordering
ZERO_TOL = 0.02  # |η(time-only, oscillating)| below 2 stderr + this counts as ≈ 0

PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Strict):
    """Ideal reverse paths per (target, magnitude, seed); OU process dX = −½X dt + dB."""

    n_paths: PosInt = 2000
    steps: PosInt = 100
    T: PosFloat = 4.0
    t0: PosFloat = 0.02
    # The reverse-time grid of processes.time_grid, as the chains' sampler.schedule.
    schedule: Literal["uniform", "geometric", "edm"] = "uniform"
    rho: PosFloat = 7.0
    regressor: Literal["poly2", "linear", "knn", "kernel", "gbm", "auto"] = "poly2"
    folds: Annotated[int, Field(ge=2)] = 5


class GMMConfig(_Strict):
    """The centred two-component mixture (``gmm``) and the paper's layout (``paper_gmm``)."""

    dim: Annotated[int, Field(ge=2)] = 10
    separation: Annotated[float, Field(ge=0.0)] = 1.0
    std: PosFloat = 0.7
    paper_std: PosFloat = 0.6


class DigitsConfig(_Strict):
    """The digits base model: an ε-MLP trained briefly by DSM on the 64-pixel digits."""

    hidden: PosInt = 256
    layers: PosInt = 3
    train_steps: PosInt = 1500
    batch_size: PosInt = 256
    lr: PosFloat = 2e-3
    n_paths: PosInt | None = None
    regressor: Literal["pca_quadratic", "poly2", "linear", "knn", "kernel", "gbm", "auto"] = \
        "pca_quadratic"
    pca_full: PosInt = 10


class ObservabilityConfig(_Strict):
    """``experiment: observability`` — see the module docstring."""

    experiment: Literal["observability"] = "observability"
    name: str = "observability"
    description: str = ""
    notes: str = ""
    targets: list[Literal["gmm", "paper_gmm", "digits"]] = ["gmm", "digits"]
    errors: list[Literal["aligned", "random_linear", "time_oscillating", "time_constant"]] = \
        list(ORDER)
    magnitudes: list[PosFloat] = [0.03, 0.1, 0.3, 1.0]
    seeds: list[Annotated[int, Field(ge=0)]] = [0, 1, 2]
    frequency: PosFloat = 5.0
    paths: PathsConfig = PathsConfig()
    gmm: GMMConfig = GMMConfig()
    digits: DigitsConfig = DigitsConfig()
    device: Literal["cpu"] = "cpu"

    @model_validator(mode="after")
    def _check(self):
        for key in ("targets", "errors", "magnitudes", "seeds"):
            values = getattr(self, key)
            if not values:
                raise ValueError(f"{key}: give at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: values must be distinct")
        if self.paths.t0 >= self.paths.T:
            raise ValueError("paths.t0: must be smaller than paths.T")
        if self.paths.n_paths < 10 * self.paths.folds:
            raise ValueError(f"paths.n_paths: need at least {10 * self.paths.folds} paths "
                             "for the cross-fitted regression")
        return self

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- configuration ---------------------------------------------------------------------------
def _raw(source, overrides) -> dict:
    from ..config import apply_override, parse_override, read_source

    data = read_source(source)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return data


def experiment_of(source, overrides=()) -> str | None:
    """The ``experiment`` key of a preset/YAML (after ``--set``), None for a chain run."""
    data = _raw(source, overrides)
    exp = data.get("experiment")
    if exp is not None and exp not in EXPERIMENTS:
        raise ConfigError("experiment", f"allowed values are {', '.join(EXPERIMENTS)} (omit the "
                                        f"key for a recursive-retraining run); got {exp!r}")
    return exp


def load_observability_config(source, overrides=()) -> ObservabilityConfig:
    """Read and validate an observability preset/YAML; any problem is one ConfigError."""
    from ..config import format_error

    data = _raw(source, overrides)
    try:
        return ObservabilityConfig.model_validate(data)
    except ValidationError as err:
        raise format_error(err) from None


def prepare_dir(cfg: ObservabilityConfig, out: Path) -> Path:
    """Create (or reopen to resume) the run directory; refuse one of another configuration."""
    from ..engine.store import atomic_write_text

    out = Path(out)
    path = out / "config.yaml"
    if path.exists():
        try:
            old = ObservabilityConfig.model_validate(yaml.safe_load(path.read_text()))
        except ValidationError:
            old = None
        meta = {"name", "description", "notes"}
        if old is None or old.model_dump(exclude=meta) != cfg.model_dump(exclude=meta):
            raise ConfigError("--out", f"{out} holds a run with a different configuration; "
                                       "choose a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, cfg.dump())
    return out


# ---- bases and errors ------------------------------------------------------------------------
def _generator(*key: int) -> torch.Generator:
    ss = np.random.SeedSequence(list(key))
    return torch.Generator().manual_seed(int(ss.generate_state(2, dtype=np.uint64)[0] % 2**63))


def gmm_law(cfg: ObservabilityConfig, target: str):
    from ..targets import GaussianMixture, paper_gmm_means

    d = cfg.gmm.dim
    if target == "paper_gmm":
        return GaussianMixture.isotropic(paper_gmm_means(d),
                                         torch.tensor(cfg.gmm.paper_std, dtype=torch.float64))
    means = torch.zeros(2, d, dtype=torch.float64)
    means[0, 0], means[1, 0] = cfg.gmm.separation, -cfg.gmm.separation
    return GaussianMixture.isotropic(means, torch.tensor(cfg.gmm.std, dtype=torch.float64))


def digits_data() -> torch.Tensor:
    from ..datasets import load_dataset

    x = load_dataset("digits", split="train").images
    return torch.from_numpy(x.reshape(len(x), -1).astype(np.float32))


def digits_base(cfg: ObservabilityConfig, root: Path, process):
    """The digits base score (trained once per run, cached as DIR/base/digits.safetensors)."""
    from ..scores.mlp import MLPNet, NeuralScore
    from ..scores.training import TrainConfig, load_checkpoint, save_checkpoint, train_dsm

    path = root / "base" / "digits.safetensors"
    if path.exists():
        ck = load_checkpoint(path)
        return NeuralScore(ck.ema_net if ck.ema_net is not None else ck.net, process)
    dc = cfg.digits
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = MLPNet(64, hidden=dc.hidden, layers=dc.layers)
    tc = TrainConfig(steps=dc.train_steps, batch_size=dc.batch_size, lr=dc.lr,
                     schedule="cosine", ema_decay=0.995, t_min=cfg.paths.t0, seed=0)
    res = train_dsm(net, digits_data(), process, tc)  # the default trainer, as fit_neural
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, res.net, res.ema_net, meta={"what": "observability digits base"})
    return NeuralScore(res.ema_net, process)


def make_error(kind: str, d: int, seed: int, frequency: float):
    """e₁ of each kind (see module docstring); random_linear draws its matrix from ``seed``."""
    from ..scores import perturbed as pt

    u = torch.ones(d, dtype=torch.float64)
    if kind == "aligned":
        return pt.aligned(1.0)
    if kind == "random_linear":
        return pt.random_linear(d, _generator(seed, 17))
    if kind == "time_oscillating":
        return pt.time_oscillating(u, frequency)
    if kind == "time_constant":
        return pt.time_constant(u)
    raise ValueError(f"unknown error kind {kind!r}")


# ---- paths and the regression ----------------------------------------------------------------
def ideal_paths(base, x: torch.Tensor, times: torch.Tensor, process,
                errors: dict[str, Callable], generator: torch.Generator):
    """Simulate the ideal reverse SDE with score ``base`` from x at times[0] to times[-1] and
    accumulate, for every error e_k (``errors``: name → (y, t) ↦ e_k(y, t)), the Girsanov
    martingale M_k = −Σ √β e_k(Y_t, t)·ΔB̄ and the path energy Q_k = Σ β‖e_k‖²Δt along the
    same Brownian increments (docs/paper.md §3). Returns (Y_t0, {name: M}, {name: Q}) in float64."""
    from ..samplers import euler_maruyama

    n = x.shape[0]
    M = {k: torch.zeros(n, dtype=torch.float64) for k in errors}
    Q = {k: torch.zeros(n, dtype=torch.float64) for k in errors}

    def cb(i, t, t_next, y, y_next, dB):
        b = float(process.beta(t))
        for k, fn in errors.items():
            e = fn(y, t).to(torch.float64).reshape(n, -1)
            M[k].sub_(math.sqrt(b) * (e * dB.to(torch.float64).reshape(n, -1)).sum(1))
            Q[k].add_(b * (t - t_next) * (e * e).sum(1))

    y = euler_maruyama(base, x, times, process, generator, callback=cb)
    return y.to(torch.float64).reshape(n, -1), M, Q


def pca_quadratic_features(Y: np.ndarray, k_full: int = 10) -> np.ndarray:
    """Features for regressing M_T on a high-dimensional Y_t0: standardised PCA coordinates z,
    all squares z_j², and the products z_i z_j (i < j) of the leading ``k_full`` components.
    For a Gaussian law E[M|Y] of an affine error is quadratic in z; this keeps the full
    quadratic where the variance is and its diagonal elsewhere. Unsupervised (no M), so the
    cross-fitting of :func:`pathwise.observability` stays honest."""
    Yc = Y - Y.mean(0)
    _, s, Vt = np.linalg.svd(Yc, full_matrices=False)
    keep = s > 1e-8 * s.max()
    z = Yc @ Vt[keep].T
    z /= z.std(0) + 1e-12
    k = min(k_full, z.shape[1])
    iu = np.triu_indices(k, 1)
    cross = (z[:, :k, None] * z[:, None, :k])[:, iu[0], iu[1]]
    return np.hstack([z, z * z, cross])


def measure_unit(cfg: ObservabilityConfig, target: str, mi: int, seed: int, base, process,
                 law=None) -> list[dict]:
    """Rows of one (target, magnitude, seed) unit: η, ε⋆² and the regression's R² per error."""
    from ..measure import pathwise as pw
    from ..processes import time_grid

    c = cfg.magnitudes[mi]
    ti = TARGETS.index(target)
    is_gmm = law is not None
    d = law.dim if is_gmm else 64
    n = cfg.paths.n_paths if is_gmm else (cfg.digits.n_paths or cfg.paths.n_paths)
    gen = _generator(seed, ti, mi, 7)
    errs = {k: make_error(k, d, seed, cfg.frequency) for k in cfg.errors}
    fns = {k: (lambda y, t, e=e: c * e(y, t)) for k, e in errs.items()}
    if is_gmm:
        x = law.marginal(process, cfg.paths.T).sample(n, gen)
    else:
        x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    times = time_grid(cfg.paths.T, cfg.paths.t0, cfg.paths.steps, schedule=cfg.paths.schedule,
                      rho=cfg.paths.rho)
    Y, M, Q = ideal_paths(base, x, times, process, fns, gen)
    Yn = Y.numpy()
    reg = cfg.paths.regressor if is_gmm else cfg.digits.regressor
    if reg == "pca_quadratic":
        X, reg_name = pca_quadratic_features(Yn, cfg.digits.pca_full), "linear"
    else:
        X, reg_name = Yn, reg
    rows = []
    base_row = {"alpha": math.nan, "seed": int(seed), "generation": 0, "target": target,
                "magnitude": float(c)}
    for k in cfg.errors:
        eta = pw.observability(X, M[k], None, regressor=reg_name, generator=gen,
                               n_folds=cfg.paths.folds)
        note = eta.note + ("" if reg != "pca_quadratic" else
                           f"; features: PCA-quadratic (full in the top {cfg.digits.pca_full})")
        if is_gmm:
            from ..scores.analytic import AnalyticScore
            from ..scores.perturbed import PerturbedScore

            eps = pw.score_energy_ideal(PerturbedScore(AnalyticScore(law, process), errs[k], c),
                                        law, process, cfg.paths.t0, cfg.paths.T)
        else:
            q = Q[k].numpy()
            eps = Estimate(float(q.mean()), float(q.std() / math.sqrt(len(q))), "monte_carlo",
                           f"mean Σβ‖e‖²Δt over {n} ideal paths of the base model (the 'ideal' "
                           "process is the trained base here)")
        r2 = Estimate(float(eta.diagnostics.get("r2_oos", math.nan)), math.nan,
                      "cross_fit_regression", f"out-of-sample R² of the regression of M_T on "
                                              f"Y_t0 ({eta.diagnostics.get('regressor')})")
        for metric, e in (("observability", eta), ("score_energy_ideal", eps),
                          ("regression_r2_oos", r2)):
            rows.append({**base_row, "error_type": k, "metric": metric, **Estimate(
                e.value, e.stderr, e.estimator, note if metric == "observability" else e.note,
            ).as_row()})
    return rows


# ---- the experiment --------------------------------------------------------------------------
RESULT_ORDER = ["alpha", "seed", "generation", "metric", "estimator", "value", "stderr", "note",
                "target", "error_type", "magnitude"]


def _cell(root: Path, target: str, c: float, seed: int) -> Path:
    from ..engine.store import fmt_key

    return root / "cells" / f"target={target}" / f"magnitude={fmt_key(float(c))}" / \
        f"seed={seed}"


def collect(root: Path) -> pd.DataFrame:
    from ..engine.store import read_json

    rows = []
    for p in sorted((Path(root) / "cells").rglob("metrics.json")):
        rows += read_json(p)["rows"]
    df = pd.DataFrame(rows, columns=RESULT_ORDER) if rows else pd.DataFrame(columns=RESULT_ORDER)
    # JSON has no NaN: the store writes it as "nan"; restore the numeric columns.
    for col in ("alpha", "magnitude", "value", "stderr"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df[["seed", "generation"]] = df[["seed", "generation"]].astype(int)
    return df.sort_values(["target", "error_type", "magnitude", "seed", "metric"],
                          kind="stable").reset_index(drop=True)


def run_observability(cfg: ObservabilityConfig, root: Path,
                      on_unit: Callable[[str, float, int, float], None] | None = None
                      ) -> pd.DataFrame:
    """Run (or resume) every (target, magnitude, seed) unit; writes results.parquet."""
    import io

    from ..engine.store import atomic_write_bytes, atomic_write_json
    from ..processes import OU
    from ..scores.analytic import AnalyticScore

    root = Path(root)
    process = OU(T=cfg.paths.T)
    t_start = time.perf_counter()
    for target in cfg.targets:
        todo = [(mi, s) for mi in range(len(cfg.magnitudes)) for s in cfg.seeds
                if not (_cell(root, target, cfg.magnitudes[mi], s) / "metrics.json").exists()]
        if not todo:
            continue
        t0 = time.perf_counter()
        if target == "digits":
            law, base = None, digits_base(cfg, root, process)
        else:
            law = gmm_law(cfg, target)
            base = AnalyticScore(law, process)
        setup = time.perf_counter() - t0
        for mi, s in todo:
            t1 = time.perf_counter()
            with torch.no_grad():
                rows = measure_unit(cfg, target, mi, s, base, process, law)
            secs = time.perf_counter() - t1
            atomic_write_json(_cell(root, target, cfg.magnitudes[mi], s) / "metrics.json",
                              {"rows": rows, "timings": {"measure": secs, "setup": setup}})
            setup = 0.0
            if on_unit is not None:
                on_unit(target, cfg.magnitudes[mi], s, secs)
    df = collect(root)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(root / "results.parquet", buf.getvalue())
    timing = root / "timing.json"
    from ..engine.store import read_json

    total = read_json(timing)["seconds"] if timing.exists() else 0.0
    atomic_write_json(timing, {"seconds": total + time.perf_counter() - t_start,
                               "note": "wall seconds summed over invocations (resumes add up)"})
    return df


# ---- summaries -------------------------------------------------------------------------------
def summarize_eta(df: pd.DataFrame) -> pd.DataFrame:
    """Per (target, error_type, magnitude): mean η over seeds with its standard error
    (seed-to-seed spread; for random_linear this includes the matrix draw), and ε⋆²."""
    eta = df[df.metric == "observability"]
    eps = df[df.metric == "score_energy_ideal"]
    r2 = df[df.metric == "regression_r2_oos"]
    out = []
    for (t, k, c), g in eta.groupby(["target", "error_type", "magnitude"], sort=True):
        v = g.value.to_numpy(float)
        se = (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1
              else float(g.stderr.iloc[0]))
        e = eps[(eps.target == t) & (eps.error_type == k) & (eps.magnitude == c)].value
        rr = r2[(r2.target == t) & (r2.error_type == k) & (r2.magnitude == c)].value
        out.append({"target": t, "error_type": k, "magnitude": c, "eta": float(v.mean()),
                    "eta_se": se, "seeds": len(v), "eps_star_sq": float(e.mean()),
                    "r2_oos": float(rr.mean())})
    return pd.DataFrame(out)


def pooled_eta(df: pd.DataFrame) -> pd.DataFrame:
    """Per (target, error_type): η pooled over magnitudes (η does not depend on the magnitude
    by construction): per seed the mean over magnitudes, then mean ± stderr over seeds."""
    eta = df[df.metric == "observability"]
    out = []
    for (t, k), g in eta.groupby(["target", "error_type"], sort=True):
        per_seed = g.groupby("seed").value.mean().to_numpy(float)
        n = len(per_seed)
        se = (float(per_seed.std(ddof=1) / math.sqrt(n)) if n > 1 else
              float(np.sqrt((g.stderr.to_numpy(float) ** 2).sum()) / len(g)))
        out.append({"target": t, "error_type": k, "eta": float(per_seed.mean()), "eta_se": se,
                    "seeds": n, "magnitudes": g.magnitude.nunique()})
    return pd.DataFrame(out)


def ordering_verdicts(pooled: pd.DataFrame) -> dict[str, str]:
    """Per target: does aligned > random_linear > time_oscillating ≈ 0 hold (2 stderr)?"""
    out = {}
    for t, g in pooled.groupby("target", sort=False):
        v = {r.error_type: (r.eta, r.eta_se) for r in g.itertuples()}
        if not all(k in v for k in ORDER):
            out[t] = "the three error types of the ordering were not all run"
            continue
        (a, sa), (r, sr), (z, sz) = (v[k] for k in ORDER)
        gaps = [(a - r, math.hypot(sa, sr), "aligned > random_linear"),
                (r - z, math.hypot(sr, sz), "random_linear > time_oscillating")]
        parts = []
        for gap, s, what in gaps:
            ok = gap > 2 * s
            parts.append(f"{what} {'holds' if ok else 'does NOT hold'} (gap {gap:.3f} ± "
                         f"{s:.3f})")
        zero = abs(z) <= 2 * sz + ZERO_TOL
        parts.append(f"time_oscillating ≈ 0 {'holds' if zero else 'does NOT hold'} "
                     f"(η = {z:.4f} ± {sz:.4f})")
        every = all(g_ > 2 * s for g_, s, _ in gaps) and zero
        head = "Fig. 2 ordering reproduced" if every else "Fig. 2 ordering NOT reproduced"
        out[t] = f"{head}: " + "; ".join(parts)
    return out


# ---- CLI glue --------------------------------------------------------------------------------
def run_observability_command(source, overrides, out, *, quiet: bool,
                              report: Callable[[Path], object] | None,
                              echo: Callable[[str], None], fail: Callable[[str, int], None]
                              ) -> None:
    """`collapselab run <observability preset>`: validate (exit 2 before any compute), run,
    report, print the pooled η table (exit 1 on a failure during the run). ``report`` builds
    the page from the run directory
    (:func:`collapselab.report.observability.build_observability_report`); None for
    ``--no-report``."""
    import json
    import traceback

    cfg = load_observability_config(source, overrides)
    root = prepare_dir(cfg, Path(out) if out else Path("runs") / cfg.name)
    units = len(cfg.targets) * len(cfg.magnitudes) * len(cfg.seeds)
    done = [0]

    def tick(target, c, seed, secs):
        done[0] += 1
        if not quiet:
            echo(f"[{done[0]}/{units}] {target} magnitude={c:g} seed={seed}: {secs:.1f} s")

    try:
        df = run_observability(cfg, root, tick)
    except Exception as exc:  # noqa: BLE001 - reported as one line, details in the log
        log = root / "run.log"
        log.write_text(traceback.format_exc())
        fail(f"observability run failed: {type(exc).__name__}: {exc} (details in {log})", 1)
        return
    if report is not None:
        report(root)
    if quiet:
        return
    echo(f"run directory: {root}")
    pooled = pooled_eta(df)
    for r in pooled.itertuples():
        echo(f"  {r.target:10s} {r.error_type:17s} eta = {r.eta:.4f} ± {r.eta_se:.4f} "
             f"({r.seeds} seeds × {r.magnitudes} magnitudes)")
    for t, v in ordering_verdicts(pooled).items():
        echo(f"  {t}: {v}")
    secs = json.loads((root / "timing.json").read_text())["seconds"]
    echo(f"  wall time: {secs:.0f} s")
