"""The layout planner: every layout of a job, its memory per GPU, and whether it fits."""

from __future__ import annotations

import dataclasses

from sara_megatron.models.architecture import MoEArchitecture
from sara_megatron.planning.lora import LoraSpec, lora_parameter_table
from sara_megatron.planning.memory import (
    GB,
    Layout,
    LayoutPlan,
    TrainingShape,
    format_plans,
    plan_layouts,
)
from sara_megatron.planning.parameters import build_meta_model, parameter_table, total_parameters
from sara_megatron.tool_errors import InputError


@dataclasses.dataclass
class PlannerResult:
    """The planner's answer for one model and job size.

    Attributes:
        total_params: parameters of the whole model, LoRA adapters included.
        trainable_params: the trained ones (all of them without `lora`).
        lora: the LoRA configuration planned, or None for full fine-tuning.
    """

    name: str
    arch: MoEArchitecture
    gpus: int
    shape: TrainingShape
    total_params: int
    plans: list[LayoutPlan]
    conversion: dict[str, dict] = dataclasses.field(default_factory=dict)
    trainable_params: int | None = None
    lora: LoraSpec | None = None

    def text(self) -> str:
        """The planner's table (`memory.format_plans`), then one line per checked conversion layout.

        Returns:
            The text `tools/plan_layout.py` prints.
        """
        lines = [format_plans(self.plans, self.name, self.gpus, self.shape, self.total_params,
                              self.lora, self.trainable_params)]
        for layout, check in self.conversion.items():
            lines.append(f"conversion at {layout}: {check['hf_tensors']} hub tensors and "
                         f"{check['megatron_tensors']} Megatron tensors map one to one over "
                         f"{check['rank_regions']} rank shards")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The result as a JSON-serialisable dict (model, counts, shape, every layout's stages).

        Returns:
            The dict `tools/plan_layout.py --json` prints.
        """
        return {
            "model": self.name,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "lora": None if self.lora is None else dataclasses.asdict(self.lora),
            "gpus": self.gpus,
            "shape": dataclasses.asdict(self.shape),
            "estimate": "formulas of sara_megatron/planning/memory.py; GB = 1e9 bytes",
            "layouts": [{
                **dataclasses.asdict(p.layout),
                "fits": p.fits,
                "gpu_memory_gb": p.gpu_memory_gb,
                "peak_stage": p.peak.stage,
                "stages": [{**dataclasses.asdict(s), "total": s.total} for s in p.stages],
                "peak_gb": p.peak.total / GB,
            } for p in self.plans],
            "conversion": self.conversion,
        }


def plan_model(name: str, arch: MoEArchitecture, gpus: int, gpu_memory_gb: float,
               shape: TrainingShape, only: Layout | None = None,
               check_conversion: bool = False, lora: LoraSpec | None = None,
               smallest: bool = False) -> PlannerResult:
    """Plan `arch` on `gpus` GPUs of `gpu_memory_gb` GB.

    Args:
        name: how the model is named in the output (preset or config path).
        arch: the architecture.
        gpus: GPUs of the job.
        gpu_memory_gb: memory of one GPU, GB (1e9 bytes).
        shape: batch shape and options.
        only: plan this layout alone (it must divide the job and the model).
        check_conversion: also check the converter's mapping at full size at every planned
            layout that fits (`conversion_check.check_conversion_at_layout`).
        lora: plan a LoRA run (frozen base, trained adapters and router) instead of full
            fine-tuning.
        smallest: plan the smallest job of 1 ... `gpus` GPUs that has a layout that fits
            (`gpus` itself when none does).

    Returns:
        The `PlannerResult`.

    Raises:
        ValueError: when no layout divides the job, or `only` is not one of them, or the LoRA
            configuration does not fit the model.
    """
    model = build_meta_model(arch)
    base_table = parameter_table(model)
    table = base_table if lora is None else lora_parameter_table(base_table, arch, lora)
    if smallest:
        for size in range(1, gpus + 1):
            if any(p.fits for p in plan_layouts(table, arch, size, gpu_memory_gb, shape, lora)):
                gpus = size
                break
    plans = plan_layouts(table, arch, gpus, gpu_memory_gb, shape, lora)
    if only is not None:
        plans = [p for p in plans if p.layout == only]
        if not plans:
            raise InputError(f"{only} is not a layout of {gpus} GPUs for this model (TP must "
                             "divide the heads and query groups, PP the layers, EP the experts "
                             "and DP, and TP·PP·DP the GPUs)")
    if not plans:
        raise InputError(f"no TP/PP/EP layout of {gpus} GPUs divides this model")
    result = PlannerResult(name, arch, gpus, shape, total_parameters(table, arch), plans,
                           trainable_params=total_parameters(table, arch, trainable_only=True),
                           lora=lora)
    if check_conversion:
        from sara_megatron.planning.conversion_check import (
            check_conversion_at_layout,
            hf_checkpoint_shapes,
        )

        hf_shapes = hf_checkpoint_shapes(arch)
        for plan in plans:
            if plan.fits:
                lay = plan.layout
                check = check_conversion_at_layout(arch, model, tp=lay.tp, ep=lay.ep, pp=lay.pp,
                                                   hf_shapes=hf_shapes)
                result.conversion[str(lay)] = dataclasses.asdict(check)
    return result
