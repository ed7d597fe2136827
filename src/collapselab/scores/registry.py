"""Score models by name: the built-in kinds and plug-ins, behind one contract (docs/plugins.md).

A *factory* called with its options returns a model object, which the loop drives as::

    model.fit(x, *, seed, process)      # train on q_i's training set, x: (n, *event_shape)
    model.sample(n, *, generator)       # either: the model draws p̂_{i+1} itself
    model.score(x, t)                   # or: ∇log q_t, sampled by the chain's sampler
    model.log_prob(x)                   # optional: exact log density of what ``sample`` draws
    model.state_dict() / model.load_state_dict(state)   # optional: safetensors checkpoints

``fit`` may also name any of the keyword arguments the loop offers (``generation``,
``device``, ``law`` — q_i's exact law or None —, ``t_min`` and ``init_state``, the warm start
of the built-in networks); only the names in its signature are passed (all of them when it
takes ``**kwargs``). A model may expose ``output_law(t0)``, the exact law of its output when
sampled by the ideal reverse process stopped at t0 (the built-in analytic and KDE models).

Factories are found, in order, among the built-in kinds (``score.kind``: analytic,
population_kde, kde, mlp, unet, diffusers; as ``factory:`` of a plugin, their options are
their ``score.*`` settings), by import path (``package.module:function``) and by name in the
``collapselab.models`` entry-point group.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from ..errors import ConfigError

ENTRY_POINT_GROUP = "collapselab.models"
FIT_EXTRAS = ("generation", "device", "law", "t_min", "init_state")


# ---- the built-in kinds as models of the contract --------------------------------------------
class AnalyticModel:
    """The oracle (``bandwidth=0``) or the population KDE of q_i: the exact score of
    q_i * N(0, h² I) pushed through the forward process (docs/paper.md §5). Needs q_i's law."""

    def __init__(self, bandwidth: float = 0.0):
        self.bandwidth = float(bandwidth)
        self.fitted = None

    def fit(self, x, *, seed: int, process, law) -> None:
        from .analytic import AnalyticScore

        if law is None:
            raise ValueError("the analytic score needs q_i's exact law")
        self.fitted = AnalyticScore(law, process, bandwidth=self.bandwidth)

    def score(self, x, t):
        return self.fitted(x, t)

    def output_law(self, t0: float):
        return self.fitted.output_law(t0)


class KDEModel:
    """The finite Gaussian KDE of the training set (the paper's GMM score model, docs/paper.md §5).
    Its law holds the whole training set, so the loop keeps only the latest one."""

    law_memory = "last"

    def __init__(self, bandwidth: float):
        self.bandwidth = float(bandwidth)
        self.fitted = None

    def fit(self, x, *, seed: int, process, device) -> None:
        from .kde import KDEScore

        self.fitted = KDEScore(x.to(device), self.bandwidth, process)

    def score(self, x, t):
        return self.fitted(x, t)

    def output_law(self, t0: float):
        return self.fitted.output_law(t0)


class NeuralModel:
    """An ε-prediction MLP or U-Net trained by denoising score matching (``score.*``); the EMA
    weights sample. ``train_result`` (raw and EMA weights) is what the loop checkpoints."""

    def __init__(self, score_cfg):
        self.cfg = score_cfg
        self.fitted = self.train_result = None

    def fit(self, x, *, seed: int, process, generation: int, device, t_min: float,
            init_state=None) -> None:
        from .neural import fit_neural

        self.fitted, self.train_result = fit_neural(
            self.cfg, process, x, generation=generation, seed=seed, t_min=t_min,
            device=device, init_state=init_state)

    def score(self, x, t):
        return self.fitted(x, t)


def _diffusers_factory(score_cfg):
    try:
        from .hf_diffusers import DiffusersModel
    except ImportError:
        raise ConfigError("score.kind", "diffusers is not installed (pip install "
                          "'collapselab[diffusers]')") from None
    return _call_factory(DiffusersModel, score_cfg.options, "diffusers")


BUILTIN: dict[str, Callable[[Any], object]] = {
    "analytic": lambda s: AnalyticModel(),
    "population_kde": lambda s: AnalyticModel(bandwidth=s.bandwidth),
    "kde": lambda s: KDEModel(s.bandwidth),
    "mlp": NeuralModel,
    "unet": NeuralModel,
    "diffusers": _diffusers_factory,
}


# ---- finding and calling factories ------------------------------------------------------------
def resolve_factory(spec: str) -> Callable[..., object]:
    """The factory named by ``package.module:function`` (dots after the colon walk attributes)
    or by an entry point of the ``collapselab.models`` group. Raises ConfigError naming
    ``score.factory`` when it cannot be found or imported."""
    spec = str(spec).strip()
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(mod_name)
        except Exception as exc:  # ImportError, or the module failing while it imports
            raise ConfigError("score.factory", f"cannot import '{mod_name}' ({_brief(exc)}); "
                              "the module must be importable (installed, or its directory "
                              "on PYTHONPATH)") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError("score.factory", f"'{mod_name}' has no attribute '{attr}'")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ConfigError("score.factory", f"'{spec}' is not callable")
        return obj
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    found = [ep for ep in eps if ep.name == spec]
    if not found:
        names = ", ".join(sorted({ep.name for ep in eps})) or "none installed"
        raise ConfigError("score.factory", f"'{spec}' is neither module:function nor a "
                          f"registered model name (entry points '{ENTRY_POINT_GROUP}': {names})")
    try:
        return found[0].load()
    except Exception as exc:
        raise ConfigError("score.factory", f"entry point '{spec}' ({found[0].value}) "
                          f"cannot be loaded ({_brief(exc)})") from None


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _call_factory(factory: Callable[..., object], options: dict, what: str) -> object:
    try:
        return factory(**dict(options or {}))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("score.options", f"{what}(**options) failed ({_brief(exc)})") from None


def _builtin_as_plugin(score_cfg) -> object:
    """``kind: plugin, factory: <built-in kind>, options: {...}``: the built-in kind with the
    options as its ``score.*`` settings (``factory: kde, options: {bandwidth: 0.3}`` is
    ``kind: kde, bandwidth: 0.3``)."""
    from pydantic import ValidationError

    data = {**score_cfg.model_dump(), "kind": score_cfg.factory, "factory": None, "options": {}}
    data.update(score_cfg.options if score_cfg.factory != "diffusers" else
                {"options": score_cfg.options})
    try:
        cfg = type(score_cfg).model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError("score.options", f"{where}: {first['msg']} (the options of the "
                          f"built-in kind '{score_cfg.factory}' are its score.* settings)"
                          ) from None
    return BUILTIN[cfg.kind](cfg)


def make_model(score_cfg) -> object:
    """A fresh, unfitted model of the configured kind."""
    if score_cfg.kind == "plugin":
        if score_cfg.factory in BUILTIN:
            return _builtin_as_plugin(score_cfg)
        return _call_factory(resolve_factory(score_cfg.factory), score_cfg.options,
                             str(score_cfg.factory))
    return BUILTIN[score_cfg.kind](score_cfg)


def contract_problem(model) -> str | None:
    """Why ``model`` does not follow the contract, or None."""
    if not callable(getattr(model, "fit", None)):
        return f"the factory returned a {type(model).__name__} without a fit method"
    if not (callable(getattr(model, "sample", None)) or callable(getattr(model, "score", None))):
        return (f"the factory returned a {type(model).__name__} with neither a sample nor a "
                "score method")
    return None


def check_model(cfg) -> None:
    """Validation before anything is written: every chain's plug-in factory imports and
    returns an object with ``fit`` and one of ``sample``/``score`` (the factory is called
    once per distinct score configuration; models should be cheap to construct)."""
    seen = set()
    for params in cfg.sweep.combinations():
        s = cfg.with_params(params).score
        if s.kind not in ("plugin", "diffusers"):
            continue
        key = repr(s.model_dump(mode="json"))
        if key in seen:
            continue
        seen.add(key)
        problem = contract_problem(make_model(s))
        if problem is not None:
            field = "score.factory" if s.kind == "plugin" else "score.kind"
            raise ConfigError(field, f"{problem} (see docs/plugins.md)")


def fit_model(model, x: torch.Tensor, *, seed: int, process, extras: dict) -> None:
    """``model.fit(x, seed=seed, process=process, **the extras its signature names)``;
    ``extras`` maps names of FIT_EXTRAS to zero-argument functions (computed only if asked)."""
    try:
        params = inspect.signature(model.fit).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {k: f() for k, f in extras.items() if takes_all or k in params}
    model.fit(x, seed=seed, process=process, **kw)


def has_output_law(model) -> bool:
    """Whether the model's output law is known exactly (``output_law``, or ``sample`` with
    ``log_prob``)."""
    return callable(getattr(model, "output_law", None)) or (
        callable(getattr(model, "sample", None)) and callable(getattr(model, "log_prob", None)))


class ModelLaw:
    """The law of a model that draws its own samples and knows their density: the Law protocol
    (``dim``, ``sample(n, generator)``, ``log_prob(x)`` on flattened float64 points) the exact-
    density estimators take. No mixture structure: χ² is then plain Monte Carlo."""

    exact_model_law = True  # D_i and I_i are of the model's own law (no ideal-process caveat)

    def __init__(self, model, event_shape: tuple[int, ...]):
        self.model, self.event_shape = model, tuple(event_shape)
        self.dim = 1
        for s in self.event_shape:
            self.dim *= s

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.model.sample(n, generator=generator)
        return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(n, self.dim)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(len(x), *self.event_shape).to(torch.float32)
        with torch.no_grad():
            out = self.model.log_prob(y)
        return torch.as_tensor(out).detach().to("cpu", torch.float64).reshape(len(x))


class ModelScore:
    """What the loop samples and measures with, for a fitted model: callable as a score when
    the model has ``score``; ``draws_itself`` when it has ``sample``; ``output_law(t0)``."""

    def __init__(self, model, event_shape: tuple[int, ...]):
        self.model, self.event_shape = model, tuple(event_shape)
        self.draws_itself = callable(getattr(model, "sample", None))
        self.has_score = callable(getattr(model, "score", None))

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.model.score(x, t)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.model.sample(n, generator=generator)

    def output_law(self, t0: float):
        law = getattr(self.model, "output_law", None)
        if callable(law):
            return law(t0)
        if self.draws_itself and callable(getattr(self.model, "log_prob", None)):
            return ModelLaw(self.model, self.event_shape)
        return None


def model_state(model) -> object | None:
    """What the loop checkpoints: a built-in network's training result, else the model's
    ``state_dict()`` (tensors), else None."""
    result = getattr(model, "train_result", None)
    if result is not None:
        return result
    fn = getattr(model, "state_dict", None)
    return fn() if callable(fn) else None
