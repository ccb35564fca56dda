"""The parameters a LoRA run adds and trains, per rank, from the whole model's parameter table.

A LoRA adapter on y = W x (W: [out, in]) is A: [r, in] and B: [out, r], sharded the way its base
layer is (B split with a column-parallel W, A with a row-parallel one); only the adapters (and a
fully trained router) get gradients and optimizer state. Per-expert adapters are expert
parameters, shared expert adapters dense ones. So the counts need nothing but the base
parameters' shapes. The sharding rules in full: docs/planning.md.
"""

from __future__ import annotations

import dataclasses

from sara_megatron.models.architecture import MoEArchitecture
from sara_megatron.peft.lora import EXPERT_ADAPTERS, LORA_TARGETS as TARGETS, ROUTER_MODES
from sara_megatron.planning.parameters import ParameterInfo
from sara_megatron.tool_errors import InputError

__all__ = ["EXPERT_ADAPTERS", "ROUTER_MODES", "TARGETS", "LoraSpec", "lora_parameter_table",
           "adapted_linears_per_token"]

# The base weight each target adapts, by the end of its parameter name.
_TARGET_SUFFIX = {
    "attention_qkv": ".self_attention.linear_qkv.weight",
    "attention_proj": ".self_attention.linear_proj.weight",
    "experts_fc1": ".linear_fc1.weight",
    "experts_fc2": ".linear_fc2.weight",
}
_ROUTER_SUFFIX = ".mlp.router.weight"
_EXPERT_PREFIX = ".mlp.experts.local_experts."


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run adapts and trains (the memory-relevant part of the training config).

    Attributes:
        rank: r, the adapters' inner width.
        targets: adapted layers, any of `TARGETS`.
        expert_adapters: "shared" (one adapter pair per layer for all its experts) or
            "per_expert" (one pair per expert).
        router: "full" (the router weight is trained), "lora" (a rank-r adapter on it) or
            "frozen".
    """

    rank: int
    targets: tuple[str, ...] = ("attention_qkv", "attention_proj", "experts_fc1", "experts_fc2")
    expert_adapters: str = "per_expert"
    router: str = "full"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; "
                             f"known: {', '.join(TARGETS)}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target")
        if self.expert_adapters not in EXPERT_ADAPTERS:
            raise ValueError(f"expert_adapters must be one of {EXPERT_ADAPTERS}, "
                             f"got {self.expert_adapters!r}")
        if self.router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {ROUTER_MODES}, got {self.router!r}")

    def describe(self) -> str:
        """A one-line description: "LoRA r=R on <targets> (<kind> expert adapters), router <mode>".

        Returns:
            The description, as the planner and errors print it.
        """
        experts = any(t.startswith("experts_") for t in self.targets)
        return (f"LoRA r={self.rank} on {', '.join(self.targets)}"
                + (f" ({self.expert_adapters.replace('_', '-')} expert adapters)" if experts
                   else "")
                + f", router {self.router}")


def _target_of(info: ParameterInfo) -> str | None:
    for target, suffix in _TARGET_SUFFIX.items():
        if info.name.endswith(suffix) and (target.startswith("experts_") == info.expert):
            return target
    return None


def _adapter_pair(base: ParameterInfo, rank: int, *, name: str, expert: bool
                  ) -> list[ParameterInfo]:
    """A: [r, in] and B: [out, r] for the 2-D base weight `base`, split like it over TP, named
    `name` + "lora_a" / "lora_b" (the adapter module's parameter names)."""
    out, inp = base.shape
    a_dim = 1 if base.tp_dim == 1 else None  # row-parallel: A splits the input like W
    b_dim = 0 if base.tp_dim == 0 else None  # column-parallel: B splits the output like W
    common = dict(expert=expert, layer=base.layer, stage=base.stage, vocab=False, trainable=True)
    return [ParameterInfo(name=f"{name}lora_a", shape=(rank, inp), tp_dim=a_dim, **common),
            ParameterInfo(name=f"{name}lora_b", shape=(out, rank), tp_dim=b_dim, **common)]


def lora_parameter_table(table: list[ParameterInfo], arch: MoEArchitecture,
                         spec: LoraSpec) -> list[ParameterInfo]:
    """The table of a LoRA run: the base parameters frozen (the router trained when
    `spec.router == "full"`), then the adapters, all `trainable`.

    Args:
        table: `parameters.parameter_table` of the whole base model.
        arch: its architecture.
        spec: the LoRA configuration.

    Returns:
        Base entries with `trainable` set, followed by one A and one B entry per adapted linear
        (per expert, or per layer for shared expert adapters) and per router LoRA.

    Raises:
        InputError: (a ValueError) for a target the model does not have (`shared_experts`:
            neither Qwen3-MoE nor PhiMoE has shared experts).
    """
    if "shared_experts" in spec.targets:
        raise InputError(f"LoRA target shared_experts: the {arch.family} model has no shared "
                         "experts")
    base = [dataclasses.replace(info, trainable=spec.router == "full"
                                and info.name.endswith(_ROUTER_SUFFIX)) for info in table]
    adapters: list[ParameterInfo] = []
    shared_done: set[tuple[int, str]] = set()
    for info in table:
        target = _target_of(info)
        if target in spec.targets:
            module = info.name[: -len(".weight")]
            if info.expert and spec.expert_adapters == "shared":
                # One pair per layer for all experts: named after the experts' module, replicated
                # on every EP rank (a dense parameter for the optimizer).
                key = (info.layer, target)
                if key in shared_done:
                    continue
                shared_done.add(key)
                layer_prefix = module.split(_EXPERT_PREFIX)[0]
                linear = module.rsplit(".", 1)[1]
                name = f"{layer_prefix}.mlp.experts.{linear}_"
                adapters += _adapter_pair(info, spec.rank, name=name, expert=False)
            else:
                adapters += _adapter_pair(info, spec.rank, name=module + ".", expert=info.expert)
        elif spec.router == "lora" and info.name.endswith(_ROUTER_SUFFIX):
            adapters += _adapter_pair(info, spec.rank, name=info.name[: -len("weight")],
                                      expert=False)
    if not adapters and spec.router != "full":
        raise InputError(f"{spec.describe()}: nothing of the {arch.family} model would train")
    return base + adapters


def adapted_linears_per_token(arch: MoEArchitecture, spec: LoraSpec) -> float:
    """Adapter outputs (A x, r values each) one token of one layer produces in a forward.

    One per adapted attention linear and router LoRA, top-k per adapted expert linear (each routed
    copy of the token passes its expert's adapter, or the shared one).

    Args:
        arch: The architecture (for top-k).
        spec: The LoRA configuration.

    Returns:
        The number of adapter outputs per token per layer.
    """
    n = sum(t in spec.targets for t in ("attention_qkv", "attention_proj"))
    n += arch.moe_router_topk * sum(t in spec.targets for t in ("experts_fc1", "experts_fc2"))
    n += spec.router == "lora"
    return n
