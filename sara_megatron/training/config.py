"""One YAML file per run, plus `--set section.key=value` overrides on the command line.

Paper defaults (SARA §4): lr 2e-5 with cosine decay, global batch 256, 2 epochs, λ_JS 1.5,
λ_LB the model's own coefficient (Qwen3-30B-A3B: 1e-3).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

import yaml


@dataclasses.dataclass
class ModelSection:
    preset: str = "qwen3_moe_tiny"  # a preset name or an HF config.json / checkpoint folder
    checkpoint: Optional[str] = None  # converted Megatron checkpoint to start from
    bf16: Optional[bool] = None  # None: bf16 on GPU, fp32 on CPU
    moe_aux_loss_coeff: Optional[float] = None  # λ_LB; None: the model's default
    recompute: bool = False
    num_layers: Optional[int] = None  # cut the preset to its first N layers (benchmarks)


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


@dataclasses.dataclass
class SaraSection:
    lambda_js: float = 1.5  # 0 = the FFT baseline, same code path
    layers: str = "range"  # "range" | "all" | "random" (the paper's -s / -a / -r)
    first_layer: Optional[int] = None  # None: the family's paper range
    last_layer: Optional[int] = None
    layer_seed: int = 0
    impl: str = "auto"  # routing-JS implementation: auto | triton | reference


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


@dataclasses.dataclass
class CheckpointSection:
    save_dir: Optional[str] = None
    save_interval: int = 0  # steps; 0 = only at the end
    resume: bool = True  # resume from save_dir's latest checkpoint when there is one


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
            kwargs[key] = value
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
    raw: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    raw = apply_overrides(raw, overrides or [])
    # YAML reads "1e-5" as a string; coerce floats where the dataclass says float.
    config = _build(TrainConfig, raw, "")
    _coerce_numbers(config)
    return config


def _coerce_numbers(section) -> None:
    for name, hint in _section_types(type(section)).items():
        value = getattr(section, name)
        if dataclasses.is_dataclass(hint):
            _coerce_numbers(value)
        elif isinstance(value, str) and hint in (float, Optional[float]):
            setattr(section, name, float(value))
