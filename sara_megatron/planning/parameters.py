"""Exact per-rank parameter counts of a model at any TP/EP/PP layout, from one meta-device build.

The whole model is built once at TP = EP = PP = 1 on the meta device (no memory); each
parameter's per-rank shape then follows from megatron's sharding rules (vocabulary and column-
parallel layers split dim 0 over TP, row-parallel weights dim 1, experts N/EP per EP rank, layers
split evenly over PP, the rest replicated), checked against models built at TP=2, EP=2 and PP=2
by tests/test_planning.py. Why one build and the rules in full: docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from sara_megatron.models.architecture import MoEArchitecture

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Non-layer parameters and the pipeline stage that holds them ("first" / "last").
_STAGE_OF = {
    "embedding.word_embeddings.weight": "first",
    "decoder.final_layernorm.weight": "last",
    "decoder.final_layernorm.bias": "last",
    "output_layer.weight": "last",
    "output_layer.bias": "last",
}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
    """One parameter of the whole (TP = EP = PP = 1) model and how megatron shards it.

    Attributes:
        name: the parameter's name in the model (`decoder.layers.3.mlp.router.weight`).
        shape: its shape in the whole model (vocabulary padded for TP = 1).
        tp_dim: the dimension split over TP (ETP for experts), or None when replicated.
        expert: whether it belongs to one routed expert (held by one EP rank).
        layer: the global 0-based layer, or None for the embedding, final norm and output layer.
        stage: "first" / "last" for parameters outside the layers, None for layer parameters.
        vocab: whether dim 0 is the padded vocabulary.
        trainable: whether it gets gradients and optimizer state (all of them in full
            fine-tuning; the adapters and maybe the router under LoRA, `planning.lora`).
    """

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    expert: bool
    layer: int | None
    stage: str | None
    vocab: bool
    trainable: bool = True

    def numel_per_rank(self, arch: MoEArchitecture, tp: int) -> int:
        """Elements one TP rank holds (the vocabulary padded for `tp`).

        Args:
            arch: The architecture (for the padded vocabulary).
            tp: Tensor-parallel size (expert tensor-parallel size for experts).

        Returns:
            The number of elements of this parameter on one TP rank.

        Raises:
            ValueError: `tp` does not divide the split dimension.
        """
        shape = list(self.shape)
        if self.vocab:
            shape[0] = arch.padded_vocab_size(tp)
        if self.tp_dim is not None:
            if shape[self.tp_dim] % tp:
                raise ValueError(f"TP={tp} does not divide dim {self.tp_dim} of {self.name} {shape}")
            shape[self.tp_dim] //= tp
        return math.prod(shape)


@dataclasses.dataclass(frozen=True)
class StageParameters:
    """Parameters held by one rank of a pipeline stage (every TP/EP rank of a stage holds as many).

    Attributes:
        stage: the pipeline stage (0-based).
        dense: parameters outside the routed experts (attention, norms, routers, embeddings):
            replicated over data parallel.
        expert: parameters of the routed experts on this rank: replicated over expert data
            parallel only.
        trainable_dense, trainable_expert: the part of `dense` / `expert` that is trained (gets
            gradients and optimizer state): all of it in full fine-tuning.
    """

    stage: int
    dense: int
    expert: int
    trainable_dense: int
    trainable_expert: int

    @property
    def total(self) -> int:
        """The parameters the rank holds, dense + expert."""
        return self.dense + self.expert

    @property
    def trainable(self) -> int:
        """The trained parameters the rank holds, dense + expert."""
        return self.trainable_dense + self.trainable_expert


def build_meta_model(arch: MoEArchitecture):
    """The whole model (TP = EP = PP = 1) on the meta device: shapes, no memory.

    Starts megatron's parallel state on a one-process gloo group when none is initialised (the
    builder reads it); an initialised state must be TP = EP = PP = 1.

    Args:
        arch: The model architecture.

    Raises:
        RuntimeError: The parallel state is initialised with a size other than 1.
    """
    from megatron.core import parallel_state as ps

    from sara_megatron.models.builder import ModelOptions, build_model

    if not ps.model_parallel_is_initialized():
        from sara_megatron.distributed import ParallelConfig, initialize_distributed

        initialize_distributed(ParallelConfig())
    sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
             ps.get_pipeline_model_parallel_world_size())
    if sizes != (1, 1, 1):
        raise RuntimeError(f"the meta build needs TP = EP = PP = 1, parallel state has {sizes}")
    options = ModelOptions(params_dtype=torch.bfloat16, bf16=True, use_te=False,
                           perform_initialization=False)
    with torch.device("meta"):
        return build_model(arch, options, pre_process=True, post_process=True)


def parameter_table(model) -> list[ParameterInfo]:
    """How megatron shards each parameter of a whole model built by `build_meta_model`.

    Args:
        model: The whole model (TP = EP = PP = 1), on the meta device.

    Returns:
        One `ParameterInfo` per parameter, in module order.

    Raises:
        ValueError: A parameter is neither in a layer nor a known non-layer parameter.
    """
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    table = []
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            tp_dim = None
            if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
                tp_dim = 0
            elif isinstance(module, RowParallelLinear) and pname == "weight":
                tp_dim = 1
            match = _LAYER.match(name)
            if match is None and name not in _STAGE_OF:
                raise ValueError(f"parameter {name} is neither in a layer nor a known "
                                 "embedding / final norm / output parameter")
            table.append(ParameterInfo(
                name=name,
                shape=tuple(param.shape),
                tp_dim=tp_dim,
                expert=bool(getattr(module, "is_expert", False)),
                layer=int(match.group(1)) if match else None,
                stage=None if match else _STAGE_OF[name],
                vocab=name in _VOCAB_PARAMS,
            ))
    return table


def stage_of(info: ParameterInfo, arch: MoEArchitecture, pp: int) -> int:
    """The pipeline stage that holds `info` at PP = `pp` (megatron's even split).

    Args:
        info: The parameter.
        arch: The architecture (for the number of layers).
        pp: Pipeline-parallel size.
    """
    if info.layer is not None:
        return info.layer // (arch.num_layers // pp)
    return 0 if info.stage == "first" else pp - 1


def stage_parameters(
    table: list[ParameterInfo], arch: MoEArchitecture, *, tp: int = 1, ep: int = 1, pp: int = 1
) -> list[StageParameters]:
    """Parameters one rank holds, for each pipeline stage, at the TP/EP/PP layout.

    Args:
        table: `parameter_table` of the whole model.
        arch: the architecture the table was built for.
        tp, ep, pp: tensor (and expert tensor), expert and pipeline parallel sizes.

    Returns:
        One `StageParameters` per pipeline stage, in stage order.

    Raises:
        ValueError: when a size does not divide the model (heads, experts, layers).
    """
    arch.validate_parallel(tp=tp, ep=ep, pp=pp)
    # [stage][expert?][trainable?]
    counts = [[[0, 0], [0, 0]] for _ in range(pp)]
    for info in table:
        # exact for experts: every expert has the same shapes and EP divides N
        counts[stage_of(info, arch, pp)][info.expert][info.trainable] += \
            info.numel_per_rank(arch, tp)
    return [StageParameters(s, dense=sum(c[0]), expert=sum(c[1]) // ep,
                            trainable_dense=c[0][1], trainable_expert=c[1][1] // ep)
            for s, c in enumerate(counts)]


def total_parameters(table: list[ParameterInfo], arch: MoEArchitecture,
                     trainable_only: bool = False) -> int:
    """Parameters of the whole model (vocabulary padded for TP = 1).

    Args:
        table: `parameter_table` of the whole model (or a LoRA table).
        arch: The architecture the table was built for.
        trainable_only: Count only the trained parameters.

    Returns:
        The number of parameters.
    """
    return sum(info.numel_per_rank(arch, 1) for info in table
               if info.trainable or not trainable_only)
