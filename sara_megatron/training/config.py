"""One YAML file per run, plus `--set section.key=value` overrides on the command line.

The sections are pydantic models: each value is parsed to its field's type and range-checked at
load time, and every problem is reported in one `ConfigError` naming its dotted key
(`optim.lr must be >= 0, got -1.0`). Paper defaults (SARA §4): lr 2e-5 with cosine decay, global
batch 256, 2 epochs, λ_JS 1.5, λ_LB the model's own coefficient (Qwen3-30B-A3B: 1e-3).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Callable, Literal, Optional, Union

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from sara_megatron.distributed import ParallelConfig
from sara_megatron.tool_errors import UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A config file or value that cannot be used: the tools print it as one line."""


# --- field types -------------------------------------------------------------------------------
# PyYAML reads "1e3" and "1.0e3" as strings (its floats need a dot and a signed exponent), and a
# `--set` value is whatever YAML makes of its text. pydantic parses the rest (lax mode: "1e-5" is
# a float, "yes" a bool, 2024 a path string); an integer may still be written 1e3, not 2.5.


def _integer_text(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # not a number: pydantic's error names it
        # Not an exact integer (2.5e0, 1e400): left as written, for pydantic to refuse.
        return int(number) if number.is_integer() else value
    return value


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_integer_text)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


def _range(expected: str, accepts: Callable[[Any], bool]) -> AfterValidator:
    """A range check naming what is expected; a float must also be finite (inf passes ">= 0":
    optim.lr=inf trained on NaN from the first step, and saved it)."""

    def check(value):
        if not accepts(value):  # not (nan >= 0): nan is refused here
            raise ValueError(f"must be {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return value

    return AfterValidator(check)


AT_LEAST_0 = _range(">= 0", lambda v: v >= 0)
AT_LEAST_1 = _range(">= 1", lambda v: v >= 1)
ABOVE_0 = _range("> 0", lambda v: v > 0)
FRACTION_BELOW_1 = _range("in [0, 1)", lambda v: 0 <= v < 1)
FRACTION = _range("in [0, 1]", lambda v: 0 <= v <= 1)


def _languages(value: Any) -> Any:
    """"targets", "all", a list of codes, or codes as text: "hi" or "hi,ne" (a bare string would
    otherwise be iterated letter by letter)."""
    if value in ("targets", "all"):
        return value
    codes = [c.strip() for c in value.split(",")] if isinstance(value, str) else value
    if (not isinstance(codes, list) or not codes
            or not all(isinstance(c, str) and c.strip() for c in codes)):
        raise ValueError(f"must be targets, all or language codes (a list or comma-separated), "
                         f"got {value!r}")
    return codes


Languages = Annotated[Union[Literal["targets", "all"], list[str]], BeforeValidator(_languages)]


def _one_of(choices: tuple[str, ...], value: str) -> str:
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
    return value


class _Section(BaseModel):
    # An unknown key is refused: a typo would otherwise be a setting silently ignored.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


# --- sections ----------------------------------------------------------------------------------


class ModelSection(_Section):
    """`model:` which model to build and start from, its precision and layer implementation
    (each field's comment says what it takes)."""
    preset: str = "qwen3_moe_tiny"  # a preset name or an HF config.json / checkpoint folder
    checkpoint: Optional[str] = None  # converted Megatron checkpoint to start from
    bf16: Optional[bool] = None  # None: bf16 on GPU, fp32 on CPU
    moe_aux_loss_coeff: Optional[Annotated[Float, AT_LEAST_0]] = None  # λ_LB; None: the model's
    recompute: bool = False
    num_layers: Optional[Annotated[Int, AT_LEAST_1]] = None  # the preset's first N layers (benchmarks)
    # megatron's MoE token dispatcher: allgather | alltoall; None: alltoall on GPU, allgather on
    # CPU. AES's orthogonality term needs allgather (docs/objectives.md).
    token_dispatcher: Optional[str] = None
    # Transformer Engine's layer spec: None = where TE and CUDA are there; false = the local spec
    # even then (benchmarks/gpu_check.py compares the two); true fails without TE.
    use_te: Optional[bool] = None


class DataSection(_Section):
    """`data:` the token shards, prior store, languages, sequence and batch sizes (global batch in
    samples, micro batch in rows), epochs, shuffling, packing and shard verification."""
    shards_dir: Optional[str] = ""
    prior_store: Optional[str] = None  # required when sara.lambda_js > 0
    languages: Languages = "targets"  # "targets", "all" or a list of codes
    seq_length: Optional[Annotated[Int, AT_LEAST_1]] = None
    micro_batch_size: Annotated[Int, AT_LEAST_1] = 1
    global_batch_size: Annotated[Int, AT_LEAST_1] = 256
    epochs: Annotated[Float, ABOVE_0] = 2.0
    shuffle: bool = True
    pad_id: Annotated[Int, AT_LEAST_0] = 0
    num_workers: Annotated[Int, AT_LEAST_0] = 0
    # Random full-length token rows and flat-Dirichlet priors instead of shards and a prior store
    # (step-time benchmarks; needs optim.train_steps). See sara_megatron.data.mock_batches.
    mock: bool = False
    # sha256 of the token shards against their manifest on first open (remembered by a stamp
    # beside each shard); structure and token ids are checked either way. docs/integrity.md
    verify_shards: bool = True
    # Several whole samples per row of seq_length, packed within each global batch (which
    # stays counted in samples); micro_batch_size counts rows. docs/packing.md
    packing: bool = False


class SaraSection(_Section):
    """`sara:` the objective (`objective`), SARA's weight λ_JS (`lambda_js`, 0 = FFT), its layers
    (a mode, a range or a divergence file), divergence, kernel and prior source. The choices are
    checked against their implementations' registries."""
    lambda_js: Annotated[Float, AT_LEAST_0] = 1.5  # 0 = the FFT baseline, same code path
    # "range" | "all" | "random" (the paper's -s / -a / -r), or a divergence JSON file
    layers: str = "range"
    first_layer: Optional[Annotated[Int, AT_LEAST_0]] = None  # None: the family's paper range
    last_layer: Optional[Annotated[Int, AT_LEAST_0]] = None
    layer_seed: Int = 0
    impl: str = "auto"  # routing-JS implementation: auto | triton | reference
    # Objectives and variants (docs/objectives.md):
    divergence: str = "js"  # js | kl | js_entropy_normalised (the last two: reference path)
    priors: str = "store"  # store (data.prior_store) | online (anchor forward in the same step)
    # sara (lambda_js 0 = FFT) | aes | shifcon, or another registered objective
    # (training.objectives)
    objective: str = "sara"

    @pydantic.field_validator("impl", "divergence", "priors", "objective")
    @classmethod
    def _known_choice(cls, value: str, info: pydantic.ValidationInfo) -> str:
        # The choices live with their implementations (imported when a config is checked).
        from sara_megatron.kernels.routing_js import IMPLEMENTATIONS
        from sara_megatron.kernels.routing_js_reference import DIVERGENCES
        from sara_megatron.sara.online_priors import PRIOR_SOURCES
        from sara_megatron.training.objectives import registered_objectives

        choices = {"impl": IMPLEMENTATIONS, "divergence": DIVERGENCES, "priors": PRIOR_SOURCES,
                   "objective": tuple(registered_objectives())}
        return _one_of(choices[info.field_name], value)

    @pydantic.model_validator(mode="after")
    def _layers(self) -> "SaraSection":
        from sara_megatron.sara.layers import check_layer_setting

        check_layer_setting(self.layers, self.first_layer, self.last_layer)  # a mode or a file
        if self.first_layer is not None and self.last_layer is not None:
            if self.first_layer > self.last_layer:
                raise ValueError(f"sara.first_layer ({self.first_layer}) is after "
                                 f"sara.last_layer ({self.last_layer})")
        return self


class AesSection(_Section):
    """AES (Guo et al., 2025): λ_LB·LB − variance_coeff·Var(routing scores) +
    orthogonality_coeff·L_orth on every MoE layer. A coefficient left unset is self-calibrated on
    the first step: 10^round(log10(target / value)), the value measured as `calibration` says."""
    variance_coeff: Optional[Annotated[Float, AT_LEAST_0]] = None
    orthogonality_coeff: Optional[Annotated[Float, AT_LEAST_0]] = None
    variance_target: Annotated[Float, AT_LEAST_0] = 1e-3
    orthogonality_target: Annotated[Float, AT_LEAST_0] = 1e-4
    # How an unset coefficient's value is measured: "measured" (every layer's term on the first
    # global batch) | "authors" (the released code's: the first MoE layer's variance on one
    # micro-batch, the orthogonality of its router weight rows). docs/objectives.md
    calibration: str = "measured"

    @pydantic.field_validator("calibration")
    @classmethod
    def _known_calibration(cls, value: str) -> str:
        from sara_megatron.sara.aes import CALIBRATIONS

        return _one_of(CALIBRATIONS, value)


class ShifconSection(_Section):
    """ShifCon (Zhang et al., 2025): non-anchor hidden states shifted by (anchor − language
    vector) entering shift_layer and back entering shift_back_layer, with an InfoNCE loss against
    the anchor translation on the mean-pooled states in between (docs/objectives.md)."""
    language_vectors: Optional[str] = None  # tools/extract_language_vectors.py output
    shift_layer: Optional[Annotated[Int, AT_LEAST_0]] = None
    shift_back_layer: Optional[Annotated[Int, AT_LEAST_1]] = None
    # The defaults are the released code's (rattlesnakey/ShifCon 516364a: src/finetune_contrast.py
    # and pipeline_train_eval.sh; docs/objectives.md). Before them this project ran τ 0.05,
    # λ_con 1, CE weight 1, one direction, constant anchors, layer b only (`--set` them back).
    contrastive_coeff: Annotated[Float, AT_LEAST_0] = 2.0
    ce_weight: Annotated[Float, ABOVE_0] = 0.5  # the cross-entropy's weight in the loss
    temperature: Annotated[Float, ABOVE_0] = 1.0
    symmetric: bool = True  # InfoNCE sample → anchors and anchor → samples, halved
    anchor_gradient: bool = True  # the anchor side trained too (its forward keeps the graph)
    contrast_layers: str = "area"  # area: mean over layer inputs a..b-1 | shift_back: b only
    # The vectors updated each step, the released rule (sara/shifcon_online.py); false: the
    # offline file's throughout.
    online_vectors: bool = False

    @pydantic.field_validator("contrast_layers")
    @classmethod
    def _known_contrast_layers(cls, value: str) -> str:
        from sara_megatron.sara.shifcon import CONTRAST_LAYERS

        return _one_of(CONTRAST_LAYERS, value)


def _targets(value: Any) -> Any:
    """A list of LoRA targets, or the same as comma-separated text (`--set peft.targets=a,b`)."""
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


class PeftSection(_Section):
    """Parameter-efficient fine-tuning (docs/peft.md). `method: null` trains every parameter;
    `lora` freezes the base and trains adapters (sara_megatron.peft.lora) and the router as
    `router` says."""
    method: Optional[str] = None  # null (full fine-tuning) | lora
    rank: Annotated[Int, AT_LEAST_1] = 16
    alpha: Annotated[Float, ABOVE_0] = 32.0  # the update is scaled by alpha / rank
    dropout: Annotated[Float, FRACTION_BELOW_1] = 0.0
    targets: Annotated[list[str], BeforeValidator(_targets)] = Field(
        default_factory=lambda: ["attention_qkv", "attention_proj", "experts_fc1", "experts_fc2"])
    expert_adapters: str = "per_expert"  # per_expert | shared (one pair per layer)
    router: str = "full"  # full (trained) | lora (frozen + adapter) | frozen
    # sara.priors online: the anchor forward with the adapters (adapted) or without (base).
    online_priors: str = "adapted"

    @pydantic.field_validator("method", "expert_adapters", "router", "online_priors")
    @classmethod
    def _known_choice(cls, value, info: pydantic.ValidationInfo):
        from sara_megatron.peft.lora import EXPERT_ADAPTERS, ROUTER_MODES

        choices = {"method": ("lora",), "expert_adapters": EXPERT_ADAPTERS,
                   "router": ROUTER_MODES, "online_priors": ("adapted", "base")}
        return value if value is None and info.field_name == "method" else _one_of(
            choices[info.field_name], value)

    @pydantic.field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        from sara_megatron.peft.lora import LORA_TARGETS

        if not value:
            raise ValueError(f"must name at least one of {', '.join(LORA_TARGETS)}")
        for target in value:
            _one_of(LORA_TARGETS, target)
        return list(dict.fromkeys(value))

    @property
    def lora(self) -> bool:
        """Whether the method is LoRA."""
        return self.method == "lora"


class OptimSection(_Section):
    """`optim:` Adam and the cosine LR schedule (lr, min_lr, warmup fraction, length in steps;
    None: from epochs and the data size), gradient clipping, the distributed optimizer, and
    whether a resume may change the schedule (`override_scheduler`)."""
    lr: Annotated[Float, AT_LEAST_0] = 2e-5
    min_lr: Annotated[Float, AT_LEAST_0] = 0.0
    weight_decay: Annotated[Float, AT_LEAST_0] = 0.0
    adam_beta1: Annotated[Float, FRACTION_BELOW_1] = 0.9
    adam_beta2: Annotated[Float, FRACTION_BELOW_1] = 0.999
    adam_eps: Annotated[Float, ABOVE_0] = 1e-8
    clip_grad: Annotated[Float, _range(">= 0 (0: no clipping)", lambda v: v >= 0)] = 1.0
    warmup_fraction: Annotated[Float, FRACTION] = 0.03
    distributed_optimizer: bool = True
    train_steps: Optional[Annotated[Int, AT_LEAST_1]] = None  # None: from epochs and the data size
    # On resume, a schedule (lr, min_lr, weight decay, warmup, length) that differs from the
    # checkpoint's is refused; true: the config's schedule takes over from the resumed step.
    override_scheduler: bool = False


class CheckpointSection(_Section):
    """`checkpoint:` where and how often to save (`save_interval` in steps, 0 = only at the end),
    and how to resume."""
    save_dir: Optional[str] = None
    # steps; 0 = only at the end
    save_interval: Annotated[Int, _range(">= 0 (0: only at the end)", lambda v: v >= 0)] = 0
    resume: bool = True  # resume from save_dir's latest checkpoint when there is one
    # A damaged latest checkpoint: false resumes from the newest intact one with a warning,
    # true refuses to start. docs/integrity.md
    strict_resume: bool = False


class LoggingSection(_Section):
    """`logging:` how often to log (steps) and where: TensorBoard, Weights & Biases, JSON lines."""
    log_interval: Annotated[Int, AT_LEAST_1] = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None  # needs the wandb package and WANDB_API_KEY in the env
    json_log: Optional[str] = None  # one JSON line per step (rank 0)


class TrainConfig(_Section):
    """A run's whole config: one field per YAML section, the training seed, and the sections that
    registered objectives bring (`section(key)`). Validation checks each value and the
    combinations across sections; `load_train_config` reads it from a file."""
    model: ModelSection = Field(default_factory=ModelSection)
    # The process layout (distributed.ParallelConfig, the one description of it); data parallel
    # is what the world size leaves.
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataSection = Field(default_factory=DataSection)
    sara: SaraSection = Field(default_factory=SaraSection)
    aes: AesSection = Field(default_factory=AesSection)
    shifcon: ShifconSection = Field(default_factory=ShifconSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    seed: Int = 1234
    # The sections objectives register with themselves (`Objective.Section`), by key, parsed;
    # written in the file as top-level sections like the ones above (`section`).
    objective_settings: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _objective_sections(cls, data: Any) -> Any:
        """Parse the sections registered objectives bring (not declared above) with their own
        models; unknown keys in them are refused like everywhere else."""
        if not isinstance(data, dict):
            return data
        from sara_megatron.training.objectives import objective_sections

        data = dict(data)
        settings = {}
        for key, section in objective_sections().items():
            if key in cls.model_fields:
                continue
            raw = data.pop(key, None)
            try:
                settings[key] = section.model_validate({} if raw is None else raw)
            except pydantic.ValidationError as err:
                raise ValueError(config_error_message(err, prefix=(key,))) from None
        data["objective_settings"] = settings
        return data

    def section(self, key: str) -> BaseModel:
        """A config section by its key, declared here or registered by an objective.

        Args:
            key: The section's key (`aes`, `shifcon`, or an objective's own `section`).

        Returns:
            The parsed section.

        Raises:
            KeyError: No section has that key.
        """
        if key in self.objective_settings:
            return self.objective_settings[key]
        if key in _sections():
            return getattr(self, key)
        raise KeyError(f"no config section {key!r}")

    @pydantic.field_validator("parallel")
    @classmethod
    def _parallel_sizes(cls, parallel: ParallelConfig) -> ParallelConfig:
        for name in ("tp", "pp", "ep", "cp", "vpp"):
            value = getattr(parallel, name)
            if value is not None and not value >= 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {value!r}")
        return parallel

    @pydantic.model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":
        from sara_megatron.training.objectives import objective_class

        sara = self.sara
        if self.model.token_dispatcher not in (None, "allgather", "alltoall"):
            raise ValueError(f"model.token_dispatcher must be allgather or alltoall (or unset), "
                             f"got {self.model.token_dispatcher!r}")
        if sara.divergence != "js" and sara.impl == "triton":
            raise ValueError(f"sara.divergence {sara.divergence} runs the PyTorch reference; the "
                             "fused kernel (sara.impl triton) computes JS only: set sara.impl "
                             "auto")
        if sara.priors == "online" and sara.objective != "sara":
            raise ValueError(f"sara.priors online feeds the SARA term; sara.objective is "
                             f"{sara.objective}")
        objective_class(sara.objective).check_config(self)  # each objective's own rules
        return self

    def to_dict(self) -> dict:
        """The settings as plain data, a dict by section (the sections objectives register
        included)."""
        return {**self.model_dump(),
                **{key: section.model_dump() for key, section in self.objective_settings.items()}}


# --- loading -----------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)  # "1e-5" -> float, "null" -> None, "[hi, ne]" -> list


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings onto a raw config mapping (values parsed as YAML;
    missing sections are created).

    Args:
        raw: The config as read from YAML; changed in place.
        overrides: The `--set` strings (None: none).

    Returns:
        `raw`.

    Raises:
        ValueError: An override has no "=", or a key on its path is not a section.
    """
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
    """The run config, parsed and checked.

    Args:
        path: The YAML file (None: the defaults).
        overrides: `section.key=value` strings applied on top (`--set`).

    Raises:
        ConfigError: A file or value that cannot be used, named in one line.
    """
    try:
        raw: dict = {}
        if path:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        raw = apply_overrides(raw, overrides or [])
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a mapping, got {type(raw).__name__}")
        # A section written with no keys (`aes:` in YAML) reads as null: its defaults.
        raw = {key: {} if value is None and key in _sections() else value
               for key, value in raw.items()}
        return TrainConfig.model_validate(raw)
    except ConfigError:
        raise
    except pydantic.ValidationError as err:
        raise ConfigError(config_error_message(err)) from None
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(str(err)) from None


# --- pydantic's errors as the config's messages ------------------------------------------------

_KIND = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}


def _sections() -> dict[str, type]:
    """Section name -> its class (a pydantic model, or ParallelConfig, a dataclass), those that
    registered objectives bring included."""
    from sara_megatron.training.objectives import objective_sections

    declared = {name: field.annotation for name, field in TrainConfig.model_fields.items()
                if isinstance(field.annotation, type)
                and (issubclass(field.annotation, BaseModel)
                     or dataclasses.is_dataclass(field.annotation))}
    return {**objective_sections(), **declared}


def _top_level_keys() -> list[str]:
    return sorted((set(TrainConfig.model_fields) - {"objective_settings"}) | set(_sections()))


def _known_keys(cls: type) -> list[str]:
    if issubclass(cls, BaseModel):
        return sorted(cls.model_fields)
    return sorted(f.name for f in dataclasses.fields(cls))


def config_error_message(err: pydantic.ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """Every problem pydantic found, one clause each, naming its dotted key: unknown keys with the
    known ones of their section, type errors in the config's words, range checks as written.

    Args:
        err: What pydantic raised.
        prefix: The keys of the section that was validated (empty: the whole config).

    Returns:
        One line.
    """
    sections = _sections()
    unknown: dict[tuple, list[str]] = {}
    problems = []
    for error in err.errors(include_url=False):
        loc = prefix + tuple(str(part) for part in error["loc"])
        key, kind, value = ".".join(loc), error["type"], error.get("input")
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            unknown.setdefault(loc[:-1], []).append(key)
        elif kind in ("model_type", "model_attributes_type", "dataclass_type", "dataclass_args_type"):
            problems.append(f"{key} must be a mapping, got {type(value).__name__}")
        elif kind == "value_error":
            message = str(error["ctx"]["error"])
            # A section's own check (a model validator) names its keys itself.
            on_section = not loc or (len(loc) == 1 and loc[0] in sections)
            problems.append(message if on_section else f"{key} {message}")
        elif kind.split("_")[0] in _KIND and kind.endswith(("_type", "_parsing", "_from_float")):
            expected = _KIND[kind.split("_")[0]]
            problems.append(f"{key} needs a value ({expected}), got null" if value is None
                            else f"{key} must be {expected}, got {value!r}")
        else:
            problems.append(f"{key}: {error['msg']}")
    for where, keys in unknown.items():
        known = _known_keys(sections[where[0]]) if where else _top_level_keys()
        problems.insert(0, f"unknown config key(s) {', '.join(keys)}; known: {', '.join(known)}")
    return "; ".join(problems)
