"""One YAML file per run, plus `--set section.key=value` overrides on the command line.

Paper defaults (SARA §4): lr 2e-5 with cosine decay, global batch 256, 2 epochs, λ_JS 1.5,
λ_LB the model's own coefficient (Qwen3-30B-A3B: 1e-3).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional

import yaml

from sara_megatron.tool_errors import UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A config file or value that cannot be used: the tools print it as one line."""


@dataclasses.dataclass
class ModelSection:
    preset: str = "qwen3_moe_tiny"  # a preset name or an HF config.json / checkpoint folder
    checkpoint: Optional[str] = None  # converted Megatron checkpoint to start from
    bf16: Optional[bool] = None  # None: bf16 on GPU, fp32 on CPU
    moe_aux_loss_coeff: Optional[float] = None  # λ_LB; None: the model's default
    recompute: bool = False
    num_layers: Optional[int] = None  # cut the preset to its first N layers (benchmarks)
    # megatron's MoE token dispatcher: allgather | alltoall; None: alltoall on GPU, allgather on
    # CPU. AES's orthogonality term needs allgather (docs/objectives.md).
    token_dispatcher: Optional[str] = None


@dataclasses.dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    vpp: Optional[int] = None


@dataclasses.dataclass
class DataSection:
    shards_dir: str = ""
    prior_store: Optional[str] = None  # required when sara.lambda_js > 0
    languages: Any = "targets"  # "targets", "all" or a list of codes
    seq_length: Optional[int] = None
    micro_batch_size: int = 1
    global_batch_size: int = 256
    epochs: float = 2.0
    shuffle: bool = True
    pad_id: int = 0
    num_workers: int = 0
    # Random full-length token rows and flat-Dirichlet priors instead of shards and a prior store
    # (step-time benchmarks; needs optim.train_steps). See sara_megatron.data.mock_batches.
    mock: bool = False
    # sha256 of the token shards against their manifest on first open (remembered by a stamp
    # beside each shard); structure and token ids are checked either way. docs/integrity.md
    verify_shards: bool = True


@dataclasses.dataclass
class SaraSection:
    lambda_js: float = 1.5  # 0 = the FFT baseline, same code path
    layers: str = "range"  # "range" | "all" | "random" (the paper's -s / -a / -r), or a divergence JSON file
    first_layer: Optional[int] = None  # None: the family's paper range
    last_layer: Optional[int] = None
    layer_seed: int = 0
    impl: str = "auto"  # routing-JS implementation: auto | triton | reference
    # Objectives and variants of issue 19 (docs/objectives.md):
    divergence: str = "js"  # js | kl | js_entropy_normalised (the last two: reference path)
    priors: str = "store"  # store (data.prior_store) | online (anchor forward in the same step)
    objective: str = "sara"  # sara (lambda_js 0 = FFT) | aes | shifcon


@dataclasses.dataclass
class AesSection:
    """AES (Guo et al., 2025): λ_LB·LB − variance_coeff·Var(routing scores) +
    orthogonality_coeff·L_orth on every MoE layer. A coefficient left unset is self-calibrated on
    the first step: 10^round(log10(target / that step's value)), as the authors do."""
    variance_coeff: Optional[float] = None
    orthogonality_coeff: Optional[float] = None
    variance_target: float = 1e-3
    orthogonality_target: float = 1e-4


@dataclasses.dataclass
class ShifconSection:
    """ShifCon (Zhang et al., 2025): non-anchor hidden states shifted by (anchor − language
    vector) entering shift_layer and back entering shift_back_layer, with an InfoNCE loss against
    the anchor translation on the mean-pooled states in between (docs/objectives.md)."""
    language_vectors: Optional[str] = None  # tools/extract_language_vectors.py output
    shift_layer: Optional[int] = None
    shift_back_layer: Optional[int] = None
    contrastive_coeff: float = 1.0
    temperature: float = 0.05


@dataclasses.dataclass
class OptimSection:
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.03
    distributed_optimizer: bool = True
    train_steps: Optional[int] = None  # None: from epochs and the data size
    # On resume, a schedule (lr, min_lr, weight decay, warmup, length) that differs from the
    # checkpoint's is refused; true: the config's schedule takes over from the resumed step.
    override_scheduler: bool = False


@dataclasses.dataclass
class CheckpointSection:
    save_dir: Optional[str] = None
    save_interval: int = 0  # steps; 0 = only at the end
    resume: bool = True  # resume from save_dir's latest checkpoint when there is one
    # A damaged latest checkpoint: false resumes from the newest intact one with a warning,
    # true refuses to start. docs/integrity.md
    strict_resume: bool = False


@dataclasses.dataclass
class LoggingSection:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None  # needs the wandb package and WANDB_API_KEY in the env
    json_log: Optional[str] = None  # one JSON line per step (rank 0)


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    sara: SaraSection = dataclasses.field(default_factory=SaraSection)
    aes: AesSection = dataclasses.field(default_factory=AesSection)
    shifcon: ShifconSection = dataclasses.field(default_factory=ShifconSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    seed: int = 1234

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    known = _section_types(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}"
            f"; known: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for key, value in values.items():
        hint = known[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)  # "1e-5" -> float, "null" -> None, "[hi, ne]" -> list


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings applied onto a raw config mapping (values parsed as YAML)."""
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        path, value = item.split("=", 1)
        node = raw
        keys = path.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = _parse_scalar(value)
    return raw


def load_train_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """The run config; a file or value that cannot be used raises ConfigError naming it."""
    try:
        raw: dict = {}
        if path:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        raw = apply_overrides(raw, overrides or [])
        config = _build(TrainConfig, raw, "")  # every value coerced to its field's type
        _validate(config)
    except ConfigError:
        raise
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(str(err)) from None
    return config


# --- coercion and validation ------------------------------------------------------------------
# YAML leaves "1e3" and "1.0e3" as strings (PyYAML's floats need a dot and a signed exponent), and
# a `--set` value is whatever YAML makes of its text; each value is brought to its field's type
# here so that a wrong one fails at load time, naming its key, not as a TypeError mid-run.

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if key == "data.languages":
        return _coerce_languages(value)
    coerce = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}.get(hint)
    if coerce is None:  # Any, or a type this table does not know: taken as given
        return value
    if value is None:
        if hint is str:
            return None  # paths left unset (`shards_dir: null`) read as "not given"
        raise ValueError(f"{key} needs a value ({_KIND[hint]}), got null")
    try:
        return coerce(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be {_KIND[hint]}, got {value!r}") from None


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _to_int(value: Any) -> int:
    # An exact integer however it is written (1000, 1e3, 1.0e3); 2.5 is refused, not truncated.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _to_float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _to_str(value: Any) -> str:
    # A path or name YAML read as a number (`--set data.shards_dir=2024`) is still that text.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(value)


def _coerce_languages(value: Any) -> Any:
    """"targets", "all", a list of codes, or codes as text: "hi" or "hi,ne" (a bare string would
    otherwise be iterated letter by letter)."""
    if value in ("targets", "all"):
        return value
    codes = [c.strip() for c in value.split(",")] if isinstance(value, str) else value
    if (not isinstance(codes, list) or not codes
            or not all(isinstance(c, str) and c.strip() for c in codes)):
        raise ValueError(f"data.languages must be targets, all or language codes (a list or "
                         f"comma-separated), got {value!r}")
    return codes


# (key, accepts, what the error says): None (an unset optional field) always passes.
_RANGES = [
    ("model.num_layers", lambda v: v >= 1, ">= 1"),
    ("model.moe_aux_loss_coeff", lambda v: v >= 0, ">= 0"),
    *((f"parallel.{k}", lambda v: v >= 1, ">= 1") for k in ("tp", "pp", "ep", "cp", "vpp")),
    ("data.seq_length", lambda v: v >= 1, ">= 1"),
    ("data.micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.global_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.epochs", lambda v: v > 0, "> 0"),
    ("data.pad_id", lambda v: v >= 0, ">= 0"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("sara.lambda_js", lambda v: v >= 0, ">= 0"),
    ("sara.first_layer", lambda v: v >= 0, ">= 0"),
    ("sara.last_layer", lambda v: v >= 0, ">= 0"),
    *((f"aes.{k}", lambda v: v >= 0, ">= 0") for k in (
        "variance_coeff", "orthogonality_coeff", "variance_target", "orthogonality_target")),
    ("shifcon.shift_layer", lambda v: v >= 0, ">= 0"),
    ("shifcon.shift_back_layer", lambda v: v >= 1, ">= 1"),
    ("shifcon.contrastive_coeff", lambda v: v >= 0, ">= 0"),
    ("shifcon.temperature", lambda v: v > 0, "> 0"),
    ("optim.lr", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_eps", lambda v: v > 0, "> 0"),
    ("optim.clip_grad", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("optim.warmup_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.train_steps", lambda v: v >= 1, ">= 1"),
    ("checkpoint.save_interval", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("logging.log_interval", lambda v: v >= 1, ">= 1"),
]


def _choices() -> list[tuple[str, tuple[str, ...]]]:
    """(key, the values it accepts) for the fields that name a mode."""
    from sara_megatron.kernels.routing_js import IMPLEMENTATIONS

    from sara_megatron.kernels.routing_js_reference import DIVERGENCES
    from sara_megatron.sara.objectives import OBJECTIVES, PRIOR_SOURCES

    return [("sara.impl", IMPLEMENTATIONS), ("sara.divergence", DIVERGENCES),
            ("sara.priors", PRIOR_SOURCES), ("sara.objective", OBJECTIVES)]


def _check_finite(config: TrainConfig) -> None:
    """Every number of the config is finite: inf passes the ">= 0" range checks (optim.lr=inf
    trained on NaN from the first step, and saved it)."""
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        items = ([(f"{section.name}.{f.name}", getattr(value, f.name))
                  for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value)
                 else [(section.name, value)])
        for key, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{key} must be a finite number, got {item!r}")


def _validate(config: TrainConfig) -> None:
    for key, accepts, expected in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        # not (v >= 0) also refuses nan, which every comparison answers False.
        if value is not None and not accepts(value):
            raise ValueError(f"{key} must be {expected}, got {value!r}")
    _check_finite(config)
    for key, choices in _choices():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    sara = config.sara
    from sara_megatron.sara.objectives import check_objective_setting

    check_objective_setting(config)
    from sara_megatron.sara.layers import check_layer_setting

    check_layer_setting(sara.layers, sara.first_layer, sara.last_layer)  # a mode or a range file
    if sara.first_layer is not None and sara.last_layer is not None:
        if sara.first_layer > sara.last_layer:
            raise ValueError(f"sara.first_layer ({sara.first_layer}) is after sara.last_layer "
                             f"({sara.last_layer})")
