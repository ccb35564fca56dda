"""Parameter-efficient fine-tuning: LoRA adapters on a built megatron-core model (`peft.lora`)."""

from sara_megatron.peft.lora import (
    EXPERT_ADAPTERS,
    LORA_TARGETS,
    ROUTER_MODES,
    LoraSettings,
    adapters,
    adapters_disabled,
    apply_lora,
    lora_parameter_names,
)

__all__ = [
    "EXPERT_ADAPTERS",
    "LORA_TARGETS",
    "ROUTER_MODES",
    "LoraSettings",
    "adapters",
    "adapters_disabled",
    "apply_lora",
    "lora_parameter_names",
]
