"""Typed, validated configuration: YAML in, resolved YAML out.

Every key is checked (type, range, cross-field consistency) before any compute; an unknown key
is an error. ``load_config`` turns any problem into a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetConfig(_Strict):
    """The target law p. ``gmm``: means (K×dim); ``paper_gmm``: the paper's layout; ``ring``:
    2-D toy; ``dataset``: images from a local dataset (p is its empirical law)."""

    kind: Literal["gmm", "ring", "paper_gmm", "dataset"] = "ring"
    dim: PosInt = 2
    means: list[list[float]] | None = None
    std: PosFloat | list[PosFloat] = 0.5
    weights: list[Annotated[float, Field(ge=0.0)]] | None = None
    n_components: PosInt = 8
    radius: PosFloat = 4.0
    dataset: Literal["digits", "fashion-mnist", "mnist", "cifar10", "npy", "npz"] = "digits"
    root: str | None = None
    classes: list[Annotated[int, Field(ge=0)]] | None = None
    downsample: PosInt | None = None
    limit: PosInt | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "ring" and self.dim != 2:
            raise ValueError("dim: the ring target is 2-D; use dim: 2")
        if self.kind == "paper_gmm" and self.dim < 2:
            raise ValueError("dim: the paper layout needs dim >= 2")
        if self.kind == "dataset":
            if self.dataset in ("npy", "npz") and not self.root:
                raise ValueError("root: required for dataset npy/npz (path of the array file)")
            return self
        if self.means is not None:
            if self.kind != "gmm":
                raise ValueError("means: only allowed with kind: gmm")
            for row in self.means:
                if len(row) != self.dim:
                    raise ValueError(f"means: every mean must have dim={self.dim} entries")
        elif self.kind == "gmm":
            raise ValueError("means: required with kind: gmm (a list of K points of length dim)")
        k = self.components
        if isinstance(self.std, list) and len(self.std) != k:
            raise ValueError(f"std: give one value or {k} values (one per component)")
        if self.weights is not None:
            if len(self.weights) != k:
                raise ValueError(f"weights: need {k} values (one per component)")
            if abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError("weights: must sum to 1")
        return self

    @property
    def components(self) -> int:
        if self.kind == "gmm":
            return len(self.means or [])
        return 5 if self.kind == "paper_gmm" else self.n_components


class ProcessConfig(_Strict):
    """Forward process: ``ou`` (the paper's) or ``vp`` with a linear β schedule."""

    kind: Literal["ou", "vp"] = "ou"
    T: PosFloat = 4.0
    beta_min: PosFloat = 0.1
    beta_max: PosFloat = 20.0


class ScoreConfig(_Strict):
    """Score model. analytic: exact score of q_i (oracle); kde: finite KDE on the training set;
    population_kde: the N → ∞ KDE (law stays a Gaussian mixture); mlp / unet: ε-prediction
    networks trained by denoising score matching (EMA weights sample)."""

    kind: Literal["analytic", "kde", "population_kde", "mlp", "unet"] = "kde"
    bandwidth: PosFloat = 0.6
    # networks
    hidden: PosInt = 128
    layers: PosInt = 3
    base_channels: PosInt = 32
    channel_mults: list[PosInt] = [1, 2]
    num_res_blocks: PosInt = 1
    attention_levels: list[Annotated[int, Field(ge=0)]] = []
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # training (denoising score matching)
    train_steps: PosInt = 2000
    epochs: PosFloat | None = None
    epochs_first: PosFloat | None = None
    batch_size: PosInt = 512
    lr: PosFloat = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["constant", "cosine"] = "constant"
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    patience: PosInt | None = None
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    warm_start: bool = False
    # CUDA speed-ups of the U-Net's DSM step (scores/gpu_fast.py): true = all, or a list of
    # bf16 / channels_last / compile / cuda_graphs. Ignored on CPU.
    gpu_fast: bool | list[str] = False

    @field_validator("gpu_fast", mode="before")
    @classmethod
    def _gpu_fast(cls, value):
        allowed = ["bf16", "channels_last", "compile", "cuda_graphs"]
        ok = isinstance(value, bool) or (
            isinstance(value, list) and all(v in allowed for v in value)
        )
        if not ok:
            got = f" (got {value!r})" if isinstance(value, list) else ""  # scalars: added
            raise ValueError(f"must be true, false or a list of {allowed}{got}")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError("patience: early stopping needs a validation split (val_fraction > 0)")
        return self


class SamplerConfig(_Strict):
    """Reverse-time sampler from T to t0 with ``steps`` steps (paper: 500, t0 = 0.02)."""

    kind: Literal["euler_maruyama", "ddpm"] = "euler_maruyama"
    steps: PosInt = 500
    t0: Annotated[float, Field(ge=0.0)] = 0.02
    # The reverse-time grid (processes.time_grid): geometric and edm are finest near t0, where
    # the reverse drift is stiffest; uniform is DDPM's grid. ε̂² and η use the same schedule.
    schedule: Literal["uniform", "geometric", "edm"] = "geometric"
    rho: PosFloat = 7.0  # the edm schedule's exponent (Karras et al. 2022)
    # DDPM's "clip_denoised" (Ho et al.'s sampler): each step's predicted x0 clamped to the
    # data range [-1, 1] of image targets. Changes the output law: images only.
    clip: bool = False


class LoopConfig(_Strict):
    """The recursion: policy building q_i's training set, generations, set sizes."""

    policy: Literal[
        "fresh_mixture", "replace", "accumulate", "accumulate_subsample", "augmentation"
    ] = "fresh_mixture"
    generations: PosInt = 5
    n_train: PosInt = 2000
    n_samples: PosInt | None = None
    augmentation_lambda: Annotated[float, Field(ge=0.0)] = 1.0

    @property
    def samples(self) -> int:
        return self.n_samples or self.n_train


class EstimatorConfig(_Strict):
    """Which divergence estimators run each generation and with how many points.

    For image targets the divergences are measured in the feature space of a classifier
    trained in-project (``feature_dim``, ``feature_epochs``); ``extra`` may then also hold
    fid_local, kid, precision_recall and density_coverage."""

    exact: bool = True
    sample_based: list[Literal["classifier", "knn"]] = ["knn"]
    n_mc: PosInt = 20000
    n_eval: PosInt = 2000
    extra: list[
        Literal[
            "second_moment",
            "sliced_w2",
            "mmd",
            "fid_local",
            "kid",
            "precision_recall",
            "density_coverage",
        ]
    ] = ["second_moment", "sliced_w2"]
    feature_dim: PosInt = 32
    feature_epochs: PosFloat | None = None


class PathwiseConfig(_Strict):
    """Path quantities per generation (PAPER.md §3), when q_i's law is known exactly:
    ε⋆² by quadrature over ``n_times`` points (``n_mc`` draws each), ε̂² along ``n_paths``
    learned trajectories, η (costly: ``n_paths`` ideal trajectories + a regression) and the
    bound_* rows of PAPER.md §4 with the unknown constants C, c and the transient i0."""

    score_energy: bool = True
    learned: bool = True
    observability: bool = False
    n_times: Annotated[int, Field(ge=3)] = 50
    n_mc: PosInt = 1000
    n_paths: PosInt = 1000
    steps: PosInt = 100
    i0: Annotated[int, Field(ge=0)] = 0
    C: Annotated[float, Field(ge=0.0)] = 0.0
    c: Annotated[float, Field(ge=0.0)] = 0.0


class SweepConfig(_Strict):
    """The grid of chains: α × seeds × any other swept key (``score.bandwidth: [0.3, 0.6]``).

    ``alpha``/``seed`` are accepted as spellings of ``alphas``/``seeds``; every other key is a
    dotted path of the configuration with a list of values, and becomes a column of the results.
    """

    alphas: list[Prob] = [0.1, 0.5, 0.9]
    seeds: list[Annotated[int, Field(ge=0)]] = [0, 1]
    grid: dict[str, list[Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _collect_grid(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for single, plural in (("alpha", "alphas"), ("seed", "seeds")):
            if single in data:
                if plural in data:
                    raise ValueError(f"{single}: give either {single} or {plural}, not both")
                data[plural] = data.pop(single)
        grid = dict(data.pop("grid", None) or {})
        for key in list(data):
            if key not in ("alphas", "seeds"):
                grid[key] = data.pop(key)
        data["grid"] = grid
        return data

    @model_validator(mode="after")
    def _nonempty(self):
        if not self.alphas:
            raise ValueError("alphas: give at least one fresh-data fraction in [0, 1]")
        if not self.seeds:
            raise ValueError("seeds: give at least one non-negative integer seed")
        for key, values in self.grid.items():
            if key.split(".")[0] in ("sweep", "name", "description", "notes"):
                raise ValueError(f"{key}: this key cannot be swept")
            if "." not in key:
                raise ValueError(
                    f"{key}: unknown key (sweep alphas, seeds or a dotted config "
                    "key such as score.bandwidth)"
                )
            if not isinstance(values, list) or not values:
                raise ValueError(f"{key}: give a non-empty list of values to sweep")
        return self

    def combinations(self) -> list[dict[str, Any]]:
        """Every assignment of the swept keys other than α and seed (one empty dict if none)."""
        combos: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            combos = [{**c, key: v} for c in combos for v in values]
        return combos


class Config(_Strict):
    name: str = "custom"
    description: str = ""
    target: TargetConfig = TargetConfig()
    process: ProcessConfig = ProcessConfig()
    score: ScoreConfig = ScoreConfig()
    sampler: SamplerConfig = SamplerConfig()
    loop: LoopConfig = LoopConfig()
    estimators: EstimatorConfig = EstimatorConfig()
    pathwise: PathwiseConfig = PathwiseConfig()
    sweep: SweepConfig = SweepConfig()
    device: Literal["cpu", "cuda"] | str = "cpu"
    notes: str = ""

    @model_validator(mode="after")
    def _cross(self):
        if self.sampler.t0 >= self.process.T:
            raise ValueError("sampler.t0: must be smaller than process.T")
        if self.sampler.schedule == "geometric" and self.sampler.t0 <= 0:
            raise ValueError("sampler.schedule: geometric needs sampler.t0 > 0 "
                             "(allowed with t0 = 0: uniform, edm)")
        image = self.target.kind == "dataset"
        if image and self.score.kind not in ("mlp", "unet"):
            raise ValueError("score.kind: image targets need a network score (mlp or unet)")
        if not image and self.score.kind == "unet":
            raise ValueError("score.kind: unet needs an image target (target.kind: dataset)")
        if self.sampler.clip and not (image and self.sampler.kind == "ddpm"):
            raise ValueError("sampler.clip: only with sampler.kind ddpm on an image target "
                             "(target.kind: dataset, pixels in [-1, 1])")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError("device: allowed values are cpu, cuda, cuda:N")
        if self.process.kind == "vp" and self.process.beta_max < self.process.beta_min:
            raise ValueError("process.beta_max: must be >= process.beta_min")
        for params in self.sweep.combinations() if self.sweep.grid else []:
            try:
                self.with_params(params)
            except ConfigError as exc:
                raise ValueError(f"sweep.{exc.field}: {str(exc).split(': ', 1)[1]}") from None
        return self

    def with_params(self, params: dict[str, Any]) -> Config:
        """The configuration of one chain of the grid: swept keys set, grid emptied."""
        if not params:
            return self
        data = self.model_dump(mode="json")
        data["sweep"]["grid"] = {}
        for key, value in params.items():
            apply_override(data, key.split("."), value)
        return build_config(data)

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading ----------------------------------------------------------------------------
def list_presets() -> dict[str, str]:
    """Preset name → one-line description."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", "")).strip().splitlines()[0:1]
        out[path.stem] = out[path.stem][0] if out[path.stem] else ""
    return out


def _read_source(source: str | Path) -> dict:
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.exists():
        names = ", ".join(list_presets())
        raise ConfigError("config", f"no preset or file named '{source}' (presets: {names})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level must be a mapping of keys")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value``; the value is parsed as YAML so lists and numbers work."""
    if "=" not in text:
        raise ConfigError("--set", f"expected key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError("--set", f"empty key in '{text}'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    path = key.strip().split(".")
    if path[0] == "sweep" and len(path) > 2:  # sweep.score.bandwidth: one swept dotted key
        path = ["sweep", ".".join(path[1:])]
    return path, value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(path), f"'{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def _format_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return ConfigError(".".join(loc), "unknown key (check the spelling; see the presets)")
    if first["type"] == "literal_error":
        return ConfigError(".".join(loc), msg.replace("Input should be", "allowed values are"))
    # Errors raised by our validators carry "field: message"; qualify the field by its section.
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        if ": " in msg:
            field, rest = msg.split(": ", 1)
            prefix = loc[:1] if loc and "." not in field else []
            return ConfigError(".".join(prefix + [field]), rest)
    got = first.get("input")
    if got is not None and not isinstance(got, dict | list):
        msg = f"{msg} (got {got!r})"
    return ConfigError(".".join(loc) or "config", msg)


def build_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _format_error(err) from None


def load_config(source: str | Path, overrides: list[str] = ()) -> Config:
    """Read a preset name or YAML file, apply ``--set`` overrides, validate everything."""
    data = _read_source(source)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return build_config(data)
