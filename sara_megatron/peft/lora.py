"""LoRA adapters on a built megatron-core `GPTModel` (local layer spec), sharded like their base.

`apply_lora(chunks, settings)` adds a low-rank update ``y = W x + (alpha / rank) · B A dropout(x)``
to the chosen linears of every transformer layer, freezes every base weight, and leaves trainable
only the adapters and (``router: full``) the routers. The base layers' classes, forward code and
parameter names are untouched: an adapter is two parameters registered on the layer that owns it
plus a forward hook, so a base checkpoint loads into an adapted model as it does into a bare one.
A starts like PEFT's, B at zero, both seeded by (seed, the adapter's global name): the same
adapters at any TP / EP / PP layout. Parameter names, shapes, sharding and gradient reduction:
docs/peft.md. Transformer Engine linears and grouped-GEMM experts are refused
(`UnsupportedLayerError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

LORA_TARGETS = ("attention_qkv", "attention_proj", "experts_fc1", "experts_fc2", "shared_experts")
EXPERT_ADAPTERS = ("shared", "per_expert")
ROUTER_MODES = ("full", "lora", "frozen")


class UnsupportedLayerError(TypeError):
    """A layer this module has no adapter for (Transformer Engine linears, grouped-GEMM experts)."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What to adapt and how.

    Attributes:
        rank: r, the inner size of B·A.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout probability on the adapter's input (training mode only).
        targets: which linears get adapters, a subset of `LORA_TARGETS`.
        expert_adapters: "per_expert" (one pair per expert, on its EP rank) or "shared" (one pair
            per layer for all of its experts).
        router: "full" (router weights trained), "lora" (frozen router + adapter), "frozen".
        seed: seeds the adapters' initialisation (with each adapter's global name).
        b_init_std: standard deviation of B at initialisation; 0 (LoRA's zero-init, the default)
            makes the adapted model compute its base's outputs. Tests use > 0 so that A's gradient
            is not zero.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("attention_qkv", "attention_proj", "experts_fc1", "experts_fc2")
    expert_adapters: str = "per_expert"
    router: str = "full"
    seed: int = 0
    b_init_std: float = 0.0

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(LORA_TARGETS)}")
        if self.expert_adapters not in EXPERT_ADAPTERS:
            raise ValueError(f"expert_adapters must be one of {EXPERT_ADAPTERS}")
        if self.router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {ROUTER_MODES}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        """The factor `alpha / rank` that multiplies each adapter's update `B A dropout(x)`."""
        return self.alpha / self.rank


@dataclasses.dataclass
class _Adapter:
    """One adapter's run-time state, kept on the layer it adapts (`layer.lora`)."""

    a: torch.nn.Parameter
    b: torch.nn.Parameter
    scale: float
    dropout: float
    # The adapter's global name ("layer3.expert5.linear_fc1", "layer3.experts.shared.linear_fc2",
    # "layer0.linear_qkv", "layer0.router"): layout-independent, seeds its initialisation.
    name: str = ""
    column: Optional[bool] = None  # column-parallel (B split by rows), row (A by columns); None: router
    gated: bool = False  # B's rows are [gate shard; up shard] (linear_fc1 of a gated unit)
    enabled: bool = True


# --- initialisation ----------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)


def _full_factors(settings: LoraSettings, name: str, in_features: int, out_features: int):
    """(A [r, in], B [out, r]) of the whole (unsharded) layer, in fp32."""
    gen = _generator(settings.seed, name)
    bound = 1.0 / math.sqrt(in_features)
    a = (torch.rand(settings.rank, in_features, generator=gen) * 2 - 1) * bound
    if settings.b_init_std > 0:
        b = torch.randn(out_features, settings.rank, generator=gen) * settings.b_init_std
    else:
        b = torch.zeros(out_features, settings.rank)
    return a, b


def _rows(full: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """This TP rank's output rows of a column-parallel tensor (gated: [gate shard; up shard])."""
    if gated:
        return torch.cat([half.chunk(size, 0)[rank] for half in full.chunk(2, 0)], 0)
    return full.chunk(size, 0)[rank]


def _group_rank_size(group) -> tuple[int, int]:
    from megatron.core.utils import get_pg_rank, get_pg_size

    return get_pg_rank(group), get_pg_size(group)


def _parameter(value: torch.Tensor, like: torch.Tensor, *, sequence_parallel: bool,
               tp_dim: Optional[int]) -> torch.nn.Parameter:
    """An adapter parameter with `like`'s dtype / device and megatron's parallel attributes."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    param = torch.nn.Parameter(value.to(device=like.device, dtype=like.dtype).contiguous())
    set_tensor_model_parallel_attributes(param, tp_dim is not None, tp_dim or 0, 1)
    # Expert weights are reduced over the expert data-parallel group (megatron's DDP reads this).
    param.allreduce = getattr(like, "allreduce", True)
    if sequence_parallel:
        param.sequence_parallel = True
    return param


# --- forward ------------------------------------------------------------------------------------


def _low_rank(adapter: _Adapter, x: torch.Tensor, training: bool) -> torch.Tensor:
    """A·dropout(x), in x's dtype."""
    x = F.dropout(x, adapter.dropout, training) if adapter.dropout > 0 else x
    return F.linear(x, adapter.a.to(x.dtype))


def _column_hook(module, args, output):
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    adapter: _Adapter = module.lora
    if not adapter.enabled:
        return output
    out, bias = output
    x = args[0]
    h = _low_rank(adapter, x, module.training)
    if module.sequence_parallel and not module.explicit_expert_comm:
        # The base layer all-gathers its sequence-parallel input; its backward reduce-scatters the
        # partial input gradients, which is what this path's partial gradients need too.
        h = gather_from_sequence_parallel_region(h, True, group=module.tp_group)
    return out + adapter.scale * F.linear(h, adapter.b.to(h.dtype)), bias


def _row_hook(module, args, output):
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    adapter: _Adapter = module.lora
    if not adapter.enabled:
        return output
    out, bias = output
    h = _low_rank(adapter, args[0], module.training)  # this rank's input columns: a partial A·x
    if module.explicit_expert_comm:
        # Expert outputs are partial sums that the token dispatcher reduces: so is B·(A_i x_i).
        return out + adapter.scale * F.linear(h, adapter.b.to(h.dtype)), bias
    _, tp = _group_rank_size(module.tp_group)
    if tp > 1:
        h = reduce_from_tensor_model_parallel_region(h, group=module.tp_group)
    y = adapter.scale * F.linear(h, adapter.b.to(h.dtype))
    if module.sequence_parallel:
        y = scatter_to_sequence_parallel_region(y, group=module.tp_group)
    return out + y, bias


def _router_gating(router, base_gating):
    def gating(input: torch.Tensor) -> torch.Tensor:
        logits = base_gating(input)
        adapter: _Adapter = router.lora
        if not adapter.enabled:
            return logits
        h = _low_rank(adapter, input.to(logits.dtype), router.training)
        return logits + adapter.scale * F.linear(h, adapter.b.to(logits.dtype))

    return gating


# --- checkpoint layout --------------------------------------------------------------------------


def _sharded_adapters(tensors: dict, prefix: str, axes: dict, sharded_offsets, metadata, tp_group,
                      gated_key: Optional[str]) -> dict:
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    made = make_sharded_tensors_for_checkpoint(
        tensors, prefix, axes, sharded_offsets, tp_group=tp_group,
        dp_cp_group=metadata["dp_cp_group"])
    if gated_key is not None:
        singleton = (metadata or {}).get("singleton_local_shards", False)
        made[prefix + gated_key] = apply_swiglu_sharded_factory(
            made[prefix + gated_key], sharded_offsets, singleton)
    return made


def _linear_sharded_state_dict(linear, column: bool, gated: bool):
    base = linear.sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        out = base(prefix, sharded_offsets, metadata)
        tensors = {"lora_a": linear.lora_a, "lora_b": linear.lora_b}
        axes = {"lora_b": 0} if column else {"lora_a": 1}
        out.update(_sharded_adapters(tensors, prefix, axes, sharded_offsets, metadata,
                                     linear.tp_group, "lora_b" if column and gated else None))
        return out

    return sharded_state_dict


def _experts_sharded_state_dict(experts, gated: bool):
    """SequentialMLP's own (local experts only) plus the layer's shared expert adapters."""
    from megatron.core.transformer.moe.experts import ensure_metadata_has_dp_cp_group

    base = experts.sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = base(prefix, sharded_offsets, metadata)
        for fc, column in (("linear_fc1", True), ("linear_fc2", False)):
            if not hasattr(experts, f"{fc}_lora_a"):
                continue
            tensors = {f"{fc}_lora_a": getattr(experts, f"{fc}_lora_a"),
                       f"{fc}_lora_b": getattr(experts, f"{fc}_lora_b")}
            axes = {f"{fc}_lora_b": 0} if column else {f"{fc}_lora_a": 1}
            out.update(_sharded_adapters(tensors, prefix, axes, sharded_offsets, metadata,
                                         experts.tp_group,
                                         f"{fc}_lora_b" if column and gated else None))
        return out

    return sharded_state_dict


# --- attaching ----------------------------------------------------------------------------------


def _check_local_linear(linear, name: str) -> bool:
    """True for megatron's ColumnParallelLinear, False for RowParallelLinear; refuses others."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    # Subclasses included (phimoe's RowParallelLinearWithBias); TE's linears are not subclasses.
    if isinstance(linear, (ColumnParallelLinear, RowParallelLinear)):
        return isinstance(linear, ColumnParallelLinear)
    raise UnsupportedLayerError(
        f"LoRA has no adapter for {name} ({type(linear).__name__}): only megatron's local "
        "ColumnParallelLinear / RowParallelLinear (the local layer spec, model.use_te: false)")


def _factors_for(linear, column: bool, gated: bool, settings: LoraSettings, name: str):
    """This rank's (A, B) shard of a linear's adapter, and which factor is TP-sharded."""
    rank, size = _group_rank_size(linear.tp_group)
    if column:
        out_full = linear.output_size_per_partition * size
        a, b = _full_factors(settings, name, linear.input_size, out_full)
        return a, _rows(b, rank, size, gated)
    in_full = linear.input_size_per_partition * size
    a, b = _full_factors(settings, name, in_full, linear.output_size)
    return a.chunk(size, 1)[rank], b


def _adapt_linear(linear, settings: LoraSettings, name: str, gated: bool = False) -> None:
    column = _check_local_linear(linear, name)
    a, b = _factors_for(linear, column, gated, settings, name)
    _, tp = _group_rank_size(linear.tp_group)
    # Replicated factors whose gradient is a per-rank partial sum: column A; the expert row B.
    partial_a = column and tp > 1
    partial_b = (not column) and linear.explicit_expert_comm and tp > 1
    linear.lora_a = _parameter(a, linear.weight, sequence_parallel=partial_a,
                               tp_dim=None if column else 1)
    linear.lora_b = _parameter(b, linear.weight, sequence_parallel=partial_b,
                               tp_dim=0 if column else None)
    _attach(linear, linear.lora_a, linear.lora_b, settings, column, name, gated)
    linear.sharded_state_dict = _linear_sharded_state_dict(linear, column, gated)


def _attach(linear, a, b, settings: LoraSettings, column: bool, name: str, gated: bool) -> None:
    # A plain attribute (not a Module): `lora` adds no state-dict entries of its own.
    object.__setattr__(linear, "lora", _Adapter(a, b, settings.scale, settings.dropout, name,
                                                column, gated and column))
    linear.register_forward_hook(_column_hook if column else _row_hook)


def _adapt_shared_experts_linears(experts, settings: LoraSettings, layer: int, gated: bool):
    """One adapter pair per linear for all of a layer's experts, registered on the experts
    module (`linear_fc1_lora_a`, ...) and used by every local expert."""
    for fc, target in (("linear_fc1", "experts_fc1"), ("linear_fc2", "experts_fc2")):
        if target not in settings.targets:
            continue
        first = getattr(experts.local_experts[0], fc)
        column = _check_local_linear(first, f"layer {layer} experts.{fc}")
        name = f"layer{layer}.experts.shared.{fc}"
        a, b = _factors_for(first, column, gated and column, settings, name)
        _, tp = _group_rank_size(first.tp_group)
        partial_a = column and tp > 1
        partial_b = (not column) and first.explicit_expert_comm and tp > 1
        # Shared by every expert of the layer on every EP rank: a dense parameter (reduced over
        # the whole data-parallel group, which holds the EP ranks), not an expert one.
        dense_like = first.weight.detach()
        pa = _parameter(a, dense_like, sequence_parallel=partial_a, tp_dim=None if column else 1)
        pb = _parameter(b, dense_like, sequence_parallel=partial_b, tp_dim=0 if column else None)
        pa.allreduce = pb.allreduce = True
        setattr(experts, f"{fc}_lora_a", pa)
        setattr(experts, f"{fc}_lora_b", pb)
        for expert in experts.local_experts:
            _attach(getattr(expert, fc), pa, pb, settings, column, name, gated)
    experts.sharded_state_dict = _experts_sharded_state_dict(experts, gated)


def _adapt_router(router, settings: LoraSettings, layer: int) -> None:
    a, b = _full_factors(settings, f"layer{layer}.router", router.weight.shape[1],
                         router.weight.shape[0])
    sp = bool(getattr(router.weight, "sequence_parallel", False))
    router.lora_a = _parameter(a, router.weight, sequence_parallel=sp, tp_dim=None)
    router.lora_b = _parameter(b, router.weight, sequence_parallel=sp, tp_dim=None)
    object.__setattr__(router, "lora", _Adapter(router.lora_a, router.lora_b, settings.scale,
                                               settings.dropout, f"layer{layer}.router"))
    router.gating = _router_gating(router, router.gating)


def _layers(chunk) -> Iterator:
    decoder = getattr(chunk, "decoder", None)
    if decoder is None:
        raise TypeError(f"apply_lora needs bare GPTModel chunks, got {type(chunk).__name__}")
    yield from decoder.layers


def apply_lora(chunks: Iterable[torch.nn.Module], settings: LoraSettings) -> list[str]:
    """Add adapters to every transformer layer of `chunks` and freeze everything else.

    Call on the bare model chunks (before DDP wraps them, so that its buffers and the optimizer
    hold only the trainable parameters), after the base weights are in place or before they
    are loaded: loading never touches the adapters.

    Args:
        chunks: this rank's `GPTModel` chunks (one per virtual pipeline stage).
        settings: what to adapt.

    Returns:
        The names (`chunk{i}.<state-dict name>`) of the parameters left trainable.

    Raises:
        UnsupportedLayerError: a target layer is not one of megatron's local linears, the experts
            are not a `SequentialMLP`, or the model has no shared experts for `shared_experts`.
        RuntimeError: TP > 1 without sequence parallel (the gradient reductions assume it).
    """
    from megatron.core.transformer.moe.experts import SequentialMLP

    chunks = list(chunks)
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        config = chunk.config
        if config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
            raise RuntimeError("LoRA adapters under TP > 1 need sequence parallel")
        gated = bool(config.gated_linear_unit)
        for layer in _layers(chunk):
            index = layer.layer_number - 1  # global, pipeline offset included
            attention = layer.self_attention
            if "attention_qkv" in settings.targets:
                _adapt_linear(attention.linear_qkv, settings, f"layer{index}.linear_qkv")
            if "attention_proj" in settings.targets:
                _adapt_linear(attention.linear_proj, settings, f"layer{index}.linear_proj")
            mlp = layer.mlp
            experts = getattr(mlp, "experts", None)
            wants_experts = {"experts_fc1", "experts_fc2"} & set(settings.targets)
            if wants_experts:
                if not isinstance(experts, SequentialMLP):
                    raise UnsupportedLayerError(
                        f"LoRA expert adapters need megatron's SequentialMLP experts (the local "
                        f"layer spec), layer {index} has {type(experts).__name__}")
                if settings.expert_adapters == "shared":
                    _adapt_shared_experts_linears(experts, settings, index, gated)
                else:
                    ep_rank, _ = _group_rank_size(experts.ep_group)
                    for j, expert in enumerate(experts.local_experts):
                        e = ep_rank * experts.num_local_experts + j
                        for fc, target in (("linear_fc1", "experts_fc1"),
                                           ("linear_fc2", "experts_fc2")):
                            if target in settings.targets:
                                _adapt_linear(getattr(expert, fc), settings,
                                              f"layer{index}.expert{e}.{fc}",
                                              gated=gated and fc == "linear_fc1")
            if "shared_experts" in settings.targets:
                shared = getattr(mlp, "shared_experts", None)
                if shared is None:
                    raise UnsupportedLayerError(
                        "LoRA target shared_experts: the model has no shared experts")
                _adapt_linear(shared.linear_fc1, settings, f"layer{index}.shared.linear_fc1",
                              gated=gated)
                _adapt_linear(shared.linear_fc2, settings, f"layer{index}.shared.linear_fc2")
            router = getattr(mlp, "router", None)
            if router is not None:
                if settings.router == "lora":
                    _adapt_router(router, settings, index)
                elif settings.router == "full":
                    for param in router.parameters():
                        param.requires_grad_(True)
        for name, param in chunk.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                param.requires_grad_(True)
    return lora_parameter_names(chunks)


def lora_parameter_names(chunks: Iterable[torch.nn.Module]) -> list[str]:
    """`chunk{i}.<name>` of every trainable parameter of `chunks` (adapters, trained routers).

    Args:
        chunks: model chunks, bare or DDP-wrapped.

    Returns:
        The names, in module order.
    """
    return [f"chunk{i}.{name}" for i, chunk in enumerate(chunks)
            for name, param in chunk.named_parameters() if param.requires_grad]


def adapters(chunks: Iterable[torch.nn.Module]) -> list[tuple[torch.nn.Module, _Adapter]]:
    """Every adapter of `chunks` once, with a module it adapts (a shared expert adapter: its
    first local expert's linear), in module order.

    Args:
        chunks: adapted model chunks, bare or DDP-wrapped.

    Returns:
        (module, adapter) pairs; `adapter.name` is the global name, `adapter.a` / `adapter.b` this
        rank's shards (layout: docs/peft.md).
    """
    seen, found = set(), []
    for chunk in chunks:
        for module in chunk.modules():
            adapter = getattr(module, "lora", None)
            if isinstance(adapter, _Adapter) and id(adapter.a) not in seen:
                seen.add(id(adapter.a))
                found.append((module, adapter))
    return found


@contextlib.contextmanager
def adapters_disabled(chunks: Iterable[torch.nn.Module]):
    """Run the base model: every adapter of `chunks` is skipped inside the block.

    Args:
        chunks: adapted model chunks, bare or DDP-wrapped.
    """
    adapters = [m.lora for chunk in chunks for m in chunk.modules()
                if isinstance(getattr(m, "lora", None), _Adapter)]
    before = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a, was in zip(adapters, before):
            a.enabled = was
