"""Exact per-rank parameter counts of a model at any TP/EP/PP layout, from one meta-device build.

Why one build at TP = EP = PP = 1 and not one build per rank: megatron-core's layers size
themselves from process-group objects (`tp_group.size()`, `pg_collection`), not only from
`parallel_state`'s overridable world sizes, so building "as rank r of TP=2" in one process means
faking process groups throughout megatron — fragile across megatron-core versions. The per-rank
shapes follow from a handful of megatron rules instead, applied to each parameter of the whole
model built once on the meta device (no memory, a few seconds for Qwen3-30B-A3B):

- `VocabParallelEmbedding` and the output layer split the padded vocabulary over TP (the padding
  is `MoEArchitecture.padded_vocab_size(tp)`, the same for every TP size that divides it);
- `ColumnParallelLinear` splits its weight's dim 0 (and its bias) over TP;
- `RowParallelLinear` splits its weight's dim 1 over TP; its bias is replicated;
- an expert linear (`is_expert`) is split over the expert tensor-parallel size, which our builder
  leaves at megatron's default (= TP), and each EP rank holds N/EP of the N experts;
- pipeline stage s holds layers [s·L/PP, (s+1)·L/PP) (megatron's even split, which the builder
  uses), the embedding on the first stage, the final norm and output layer on the last;
- everything else (norms, routers, q/k norms) is replicated.

The flags megatron sets on parameters (`tensor_model_parallel`, `partition_dim`, `allreduce`)
are not used: at TP = EP = 1 without initialisation megatron leaves them unset, and marks an
expert's `allreduce=False` only when EP > 1. The rules are checked against models actually built
at TP=2, EP=2 and PP=2 in a 2-rank gloo launch (tests/test_planning.py).
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
        """Elements one TP rank holds (the vocabulary padded for `tp`)."""
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
        return self.dense + self.expert

    @property
    def trainable(self) -> int:
        return self.trainable_dense + self.trainable_expert


def build_meta_model(arch: MoEArchitecture):
    """The whole model (TP = EP = PP = 1) on the meta device: shapes, no memory.

    Starts megatron's parallel state on a one-process gloo group when none is initialised (the
    builder reads it); an initialised state must be TP = EP = PP = 1.
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
    """How megatron shards each parameter of a whole model built by `build_meta_model`."""
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
    """The pipeline stage that holds `info` at PP = `pp` (megatron's even split)."""
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
    """Parameters of the whole model (vocabulary padded for TP = 1); only the trained ones
    when `trainable_only`."""
    return sum(info.numel_per_rank(arch, 1) for info in table
               if info.trainable or not trainable_only)
