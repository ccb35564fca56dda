"""Conversion checked at full size without weights: transformers' model and ours on the meta device.

For a layout, every rank's shard of every Megatron checkpoint tensor is mapped to hub tensors
through the converter's own mapping, with a reader that records the rows and columns asked for
instead of reading bytes. It holds that the mapping's hub tensors are exactly transformers'
checkpoint keys and shapes, that each Megatron tensor's shards tile it exactly once, and that
every element of every hub tensor is read by exactly one distinct shard. Details:
docs/planning.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterable

import torch

from sara_megatron.conversion.errors import ConversionError
from sara_megatron.conversion.mapping import (
    EMBEDDING,
    OUTPUT_BIAS,
    OUTPUT_WEIGHT,
    ModelMapping,
    build_mapping,
)
from sara_megatron.models.architecture import MoEArchitecture
from sara_megatron.planning.parameters import ParameterInfo, parameter_table, stage_of

_VOCAB_KEYS = (EMBEDDING, OUTPUT_WEIGHT, OUTPUT_BIAS)
Box = tuple[tuple[int, int], ...]  # [start, stop) per axis


@dataclasses.dataclass(frozen=True)
class ShardTemplate:
    """One ShardedTensor of the TP = EP = PP = 1 model and the parameter it belongs to."""

    key: str
    index: tuple[int, ...]
    offset: tuple[int, ...]  # within the tensor (after the prepended axes)
    extent: tuple[int, ...]
    info: ParameterInfo


@dataclasses.dataclass(frozen=True)
class Region:
    """One rank's region of a Megatron checkpoint tensor (key at index)."""

    key: str
    index: tuple[int, ...]
    box: Box


@contextlib.contextmanager
def _quiet_transformers():
    """PhimoeConfig warns that longrope's mscales are "unrecognized" (its model reads them) and
    asks for a `factor`: noise where the config is a preset's. Errors still show."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def hf_config(arch: MoEArchitecture):
    """transformers' config object of `arch` (Qwen3MoeConfig or PhimoeConfig).

    Args:
        arch: The architecture.

    Returns:
        The transformers config.

    Raises:
        ValueError: for a family without a config here.
    """
    import transformers

    common = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        router_aux_loss_coef=arch.router_aux_loss_coef, rms_norm_eps=arch.norm_epsilon,
        num_experts_per_tok=arch.moe_router_topk,
    )
    if arch.family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            head_dim=arch.kv_channels, num_experts=arch.num_experts,
            moe_intermediate_size=arch.moe_ffn_hidden_size, norm_topk_prob=arch.norm_topk_prob,
            rope_theta=arch.rotary_base, **common,
        )
    if arch.family == "phimoe":
        rope = None
        if arch.longrope is not None:
            r = arch.longrope
            rope = dict(rope_type="longrope", rope_theta=arch.rotary_base,
                        short_factor=list(r.short_factor), long_factor=list(r.long_factor),
                        short_mscale=r.short_mscale, long_mscale=r.long_mscale,
                        original_max_position_embeddings=r.original_max_position_embeddings)
        with _quiet_transformers():
            return transformers.PhimoeConfig(
                num_local_experts=arch.num_experts, intermediate_size=arch.moe_ffn_hidden_size,
                attention_bias=arch.add_qkv_bias, lm_head_bias=arch.add_lm_head_bias,
                router_jitter_noise=arch.router_jitter_noise,
                input_jitter_noise=arch.input_jitter_noise,
                **({"rope_parameters": rope} if rope else {"rope_theta": arch.rotary_base}),
                **common,
            )
    raise ValueError(f"no transformers config for family {arch.family!r}")


def hf_checkpoint_shapes(arch: MoEArchitecture) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of `arch`'s hub checkpoint.

    transformers' model is built on the meta device and its state dict taken in the layout
    `save_pretrained` writes (per-expert keys).

    Args:
        arch: The architecture.

    Returns:
        Hub tensor name → shape.
    """
    import transformers

    with torch.device("meta"), _quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_config(hf_config(arch))
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x keeps the checkpoint layout in memory
        pass
    else:
        state = revert_weight_conversion(model, state)
    return {name: tuple(t.shape) for name, t in state.items()}


def shard_templates(model) -> list[ShardTemplate]:
    """The ShardedTensors of a whole model built by `planning.parameters.build_meta_model`.

    Megatron's checkpoint keys, layer / expert indices, fc1 as its [gate; up] halves.

    Args:
        model: The whole model (TP = EP = PP = 1) on the meta device.

    Returns:
        One `ShardTemplate` per sharded tensor.

    Raises:
        ConversionError: An unexpected sharded state entry, or one that is not a parameter.
    """
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    infos = {info.name: info for info in parameter_table(model)}
    templates = []
    for name, value in model.sharded_state_dict(prefix="").items():
        if isinstance(value, ShardedObject):
            continue  # extra state, not weights
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            shards = list(built.values()) if isinstance(built, dict) else list(built)
        elif isinstance(value, ShardedTensor):
            shards = [value]
        else:
            raise ConversionError(f"unexpected sharded state entry {name}: {type(value).__name__}")
        if name not in infos:
            raise ConversionError(f"sharded state entry {name} is not a parameter")
        for sh in shards:
            n = sh.prepend_axis_num
            templates.append(ShardTemplate(
                key=sh.key, index=tuple(sh.global_offset[:n]),
                offset=tuple(sh.global_offset[n:]), extent=tuple(sh.local_shape),
                info=infos[name],
            ))
    return templates


def rank_regions(templates: Iterable[ShardTemplate], arch: MoEArchitecture, *, tp: int, ep: int,
                 pp: int, tp_rank: int, ep_rank: int, pp_rank: int) -> list[Region]:
    """The checkpoint regions one rank holds at the layout (megatron's sharding rules).

    Args:
        templates: The whole model's shards (`shard_templates`).
        arch: The architecture.
        tp: Tensor-parallel size.
        ep: Expert-parallel size.
        pp: Pipeline-parallel size.
        tp_rank: The rank's tensor-parallel rank.
        ep_rank: Its expert-parallel rank.
        pp_rank: Its pipeline stage.

    Returns:
        The rank's `Region`s (key, stacked index, box per axis).
    """
    per_ep = arch.num_experts // ep
    regions = []
    for t in templates:
        info = t.info
        if stage_of(info, arch, pp) != pp_rank:
            continue
        if info.expert and not ep_rank * per_ep <= t.index[1] < (ep_rank + 1) * per_ep:
            continue
        box = [[o, o + e] for o, e in zip(t.offset, t.extent)]
        if info.vocab:
            box[0][1] = arch.padded_vocab_size(tp)
        if info.tp_dim is not None:
            lo, hi = box[info.tp_dim]
            step = (hi - lo) // tp
            box[info.tp_dim] = [lo + tp_rank * step, lo + (tp_rank + 1) * step]
        regions.append(Region(t.key, t.index, tuple(map(tuple, box))))
    return regions


def _check_tiling(boxes: set[Box], shape: tuple[int, ...], what: str) -> None:
    """Raise unless `boxes` cover every element of `shape` exactly once."""
    ordered = sorted(boxes)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b)):
                raise ConversionError(f"{what}: shards {a} and {b} overlap")
        if any(not 0 <= lo < hi <= n for (lo, hi), n in zip(a, shape)):
            raise ConversionError(f"{what}: shard {a} outside shape {shape}")
    covered = sum(math.prod(hi - lo for lo, hi in box) for box in ordered)
    if covered != math.prod(shape):
        raise ConversionError(f"{what}: shards cover {covered} of {math.prod(shape)} elements")


@dataclasses.dataclass(frozen=True)
class ConversionCheck:
    """What `check_conversion_at_layout` went through."""

    hf_tensors: int
    megatron_tensors: int
    rank_regions: int
    reads: int


def check_conversion_at_layout(arch: MoEArchitecture, model, *, tp: int = 1, ep: int = 1,
                               pp: int = 1,
                               hf_shapes: dict[str, tuple[int, ...]] | None = None
                               ) -> ConversionCheck:
    """Check the converter's mapping for `arch` at a TP/EP/PP layout, on shapes alone.

    Args:
        arch: the architecture.
        model: its whole model on the meta device (`planning.parameters.build_meta_model`).
        tp, ep, pp: the layout (its DP replicas hold the same shards and add nothing).
        hf_shapes: the hub checkpoint's tensor shapes; default `hf_checkpoint_shapes(arch)`.

    Returns:
        Counts of what was checked.

    Raises:
        ConversionError: naming the first tensor that is missing, misshapen, uncovered or
            covered twice.
    """
    arch.validate_parallel(tp=tp, ep=ep, pp=pp)
    hf_shapes = hf_checkpoint_shapes(arch) if hf_shapes is None else hf_shapes
    build_mapping(arch).check_hf_tensors(hf_shapes, where=f"transformers' {arch.family} model")
    mapping: ModelMapping = build_mapping(arch, arch.padded_vocab_size(tp))
    templates = shard_templates(model)
    for t in templates:  # every Megatron tensor known to the mapping, with its global shape
        m = mapping.get(t.key, t.index)
        if t.key not in _VOCAB_KEYS and any(o + e > n for o, e, n in
                                            zip(t.offset, t.extent, m.shape)):
            raise ConversionError(f"{t.key}{list(t.index)}: the model's shard {t.offset}+"
                                  f"{t.extent} does not fit the mapping's shape {m.shape}")

    regions: set[Region] = set()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            for ep_rank in range(ep):
                regions.update(rank_regions(templates, arch, tp=tp, ep=ep, pp=pp,
                                            tp_rank=tp_rank, ep_rank=ep_rank, pp_rank=pp_rank))
    by_tensor: dict[tuple[str, tuple[int, ...]], set[Box]] = {}
    for r in regions:
        by_tensor.setdefault((r.key, r.index), set()).add(r.box)
    for m in mapping.mappings:
        if (m.key, m.index) not in by_tensor:
            raise ConversionError(f"{m.key}{list(m.index)}: in the mapping, held by no rank")
    hf_boxes: dict[str, list[Box]] = {}
    reads = 0

    def record(name, rows, rest, out=None):
        nonlocal reads
        if name not in hf_shapes:
            raise ConversionError(f"the mapping reads {name}, which transformers' model lacks")
        shape = hf_shapes[name]
        cols = tuple(s.indices(n)[:2] for s, n in zip(rest, shape[1:]))
        box = (tuple(rows),) + cols
        got = tuple(hi - lo for lo, hi in box)
        if out is not None and tuple(out.shape) != got:
            raise ConversionError(f"{name}: a read of {box} lands in a {tuple(out.shape)} region")
        hf_boxes.setdefault(name, []).append(box)
        reads += 1
        return out

    for (key, index), boxes in by_tensor.items():
        m = mapping.get(key, index)
        _check_tiling(boxes, m.shape, f"Megatron tensor {key}{list(index)}")
        for box in boxes:
            out = torch.empty(tuple(hi - lo for lo, hi in box), device="meta")
            m.read_region(tuple(slice(lo, hi) for lo, hi in box), record, out=out)
    for name, shape in hf_shapes.items():
        if name not in hf_boxes:
            raise ConversionError(f"hub tensor {name} is read by no rank")
        if len(set(hf_boxes[name])) != len(hf_boxes[name]):
            raise ConversionError(f"hub tensor {name}: a region is read by two shards")
        _check_tiling(set(hf_boxes[name]), shape, f"hub tensor {name}")
    return ConversionCheck(hf_tensors=len(hf_shapes), megatron_tensors=len(by_tensor),
                           rank_regions=len(regions), reads=reads)
