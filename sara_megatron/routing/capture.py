"""Dense routing capture: router logits, the fp32 softmax over all experts and its masked
sequence-mean (paper Eq. 5 and 6) for chosen layers, during an ordinary forward pass.

    seg = segment_ids_from_padding_mask(pad)               # [B, S], -1 = padding
    groups = model_process_groups()                        # once, at the top (None: one process)
    with capture_routing(model, seg, layers=range(1, 3), process_groups=groups) as cap:
        logits = model(tokens, positions, attention_mask)
    cap[1].seq_mean                                        # [B, N] fp32, global over SP/CP ranks

Sharding: the capture slices the segment ids like megatron's sequence-parallel token order and
sums the masked probabilities and counts over the TP (and CP) group before dividing, so
`seq_mean` is the whole-sequence mean on every rank; each pipeline stage reports the layers it
owns, under global 0-based indices. The model's output is unchanged (read outside autograd).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.routing.observers import observe_routers


@dataclasses.dataclass
class LayerRouting:
    """One layer's captured routing on this rank (field shapes in the comments; N experts)."""

    layer: int  # global 0-based layer index (HF `model.layers.i`)
    logits: torch.Tensor  # [T_local, N] router logits, this rank's tokens in [S, B] order
    probs: Optional[torch.Tensor]  # [T_local, N] fp32 softmax over all experts (keep_probs)
    segment_ids: torch.Tensor  # [T_local] sequence of each local token, -1 = padding
    prob_sum: torch.Tensor  # [B, N] fp32 Σ_t m_t R(t), summed over the reduction group
    token_count: torch.Tensor  # [B] fp32 Σ_t m_t, summed over the reduction group

    @property
    def seq_mean(self) -> torch.Tensor:
        """[B, N] masked sequence-mean routing distribution; rows of empty sequences are 0."""
        return self.prob_sum / self.token_count.clamp_min(1.0).unsqueeze(-1)

    @property
    def empty(self) -> torch.Tensor:
        """[B] True for sequences with no valid token (their `seq_mean` row is meaningless)."""
        return self.token_count == 0


def segment_ids_from_padding_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """One segment per batch row: the row index of each token, -1 for padding.

    Args:
        padding_mask: [B, S] bool, True = padding (megatron's convention).

    Returns:
        [B, S] int64 segment ids.

    Raises:
        ValueError: the mask is not two-dimensional.
    """
    if padding_mask.dim() != 2:
        raise ValueError(f"padding mask must be [B, S], got shape {tuple(padding_mask.shape)}")
    batch = torch.arange(padding_mask.shape[0], device=padding_mask.device).unsqueeze(1)
    return torch.where(padding_mask.bool(), torch.full_like(batch, -1), batch).expand_as(
        padding_mask
    ).contiguous()


def masked_segment_sums(
    probs: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over tokens of each segment of their probabilities, and their count; -1 ignored.

    Args:
        probs: [T, N] per-token probabilities.
        segment_ids: [T] segment of each token, -1 = padding.
        num_segments: B, the number of segments (rows of the result).

    Returns:
        ([B, N] probability sums, [B] token counts), in `probs`' dtype.
    """
    valid = segment_ids >= 0
    index = segment_ids.clamp_min(0)
    weights = valid.to(probs.dtype)
    sums = torch.zeros(num_segments, probs.shape[-1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, index, probs * weights.unsqueeze(-1))
    counts = torch.zeros(num_segments, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, index, weights)
    return sums, counts


def check_process_groups(process_groups: Optional[ProcessGroupCollection], user: str) -> None:
    """None stands for one process alone: refuse it in a world of several ranks, where the
    result would silently be one rank's share.

    Args:
        process_groups: the model's groups, or None.
        user: what needs them, for the message.

    Raises:
        ValueError: None in an initialised world of more than one rank.
    """
    if process_groups is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"{user} runs on {dist.get_world_size()} ranks: pass process_groups "
                         "(sara_megatron.distributed.model_process_groups())")


def routing_reduction_group(
    process_groups: Optional[ProcessGroupCollection],
) -> Optional[dist.ProcessGroup]:
    """The group over which one sequence's tokens are spread: TP (with sequence parallel) × CP;
    None when that is one rank.

    Args:
        process_groups: the model's groups (`tp_cp` is read), or None for one process.
    """
    if process_groups is None:
        return None
    group = process_groups.tp_cp
    return group if dist.get_world_size(group) > 1 else None


def local_token_segment_ids(
    segment_ids: torch.Tensor, sequence_parallel: bool, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """Model-input segment ids in the MoE layer's token order on this TP rank.

    Args:
        segment_ids: [B, S] segment ids of the model input.
        sequence_parallel: whether the sequence is split over the TP group.
        tp_rank, tp_size: this rank's place in the tensor-parallel group.

    Returns:
        [S_local·B] ids, sequence-major; S_local = S / tp_size under sequence parallel, else S.

    Raises:
        ValueError: S is not divisible by `tp_size` under sequence parallel.
    """
    seq_major = segment_ids.transpose(0, 1)  # [S, B], Megatron's layout
    if sequence_parallel and tp_size > 1:
        s = seq_major.shape[0]
        if s % tp_size:
            raise ValueError(f"sequence length {s} is not divisible by TP size {tp_size}")
        chunk = s // tp_size
        seq_major = seq_major[tp_rank * chunk : (tp_rank + 1) * chunk]
    return seq_major.reshape(-1)


def router_segment_ids(
    segment_ids: torch.Tensor, num_tokens: int, device, sequence_parallel: Optional[bool] = None,
    process_groups: Optional[ProcessGroupCollection] = None,
) -> torch.Tensor:
    """The segment id of each token a router on this rank sees ([S_local·B]).

    Args:
        segment_ids: [B, S] ids of the model input (context-parallel-local if CP > 1).
        num_tokens: how many tokens the router saw, to check against.
        device: where the result goes.
        sequence_parallel: None: on when TP > 1 (our models always run MoE + TP with sequence
            parallel).
        process_groups: the model's groups (`tp` is read), or None for one process.

    Raises:
        ValueError: the ids give another number of local tokens than `num_tokens`.
    """
    tp_group = process_groups.tp if process_groups is not None else None
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    sp = tp_size > 1 if sequence_parallel is None else sequence_parallel
    ids = local_token_segment_ids(segment_ids, sp, tp_rank, tp_size).to(device)
    if ids.numel() != num_tokens:
        raise ValueError(
            f"segment ids give {ids.numel()} local tokens but the router saw {num_tokens}; "
            "pass the [B, S] ids of the model input (context-parallel-local if CP > 1)"
        )
    return ids


class RoutingCapture:
    """Router observer that records dense routing for chosen layers (see module docstring).

    Records are kept in `records` (global layer index -> `LayerRouting`) and read as
    `capture[layer]`; one capture serves one forward pass.

    Args:
        segment_ids: [B, S] segment ids of the model input, -1 = padding.
        layers: global 0-based layers to capture; None: every MoE layer of this rank.
        sequence_parallel: as in `router_segment_ids` (None: on when TP > 1).
        keep_probs: keep each layer's [T_local, N] softmax (else only the sums).
        num_segments: rows of the sums; None: B.
        process_groups: the model's groups; None only in a one-process world.

    Raises:
        ValueError: `segment_ids` is not [B, S], or `process_groups` is None on several ranks.
    """

    def __init__(
        self,
        segment_ids: torch.Tensor,
        layers: Optional[Iterable[int]] = None,
        *,
        sequence_parallel: Optional[bool] = None,
        keep_probs: bool = True,
        num_segments: Optional[int] = None,
        process_groups: Optional[ProcessGroupCollection] = None,
    ):
        check_process_groups(process_groups, "routing capture")
        if segment_ids.dim() != 2:
            raise ValueError(
                f"segment_ids must be [B, S] like the model input, got {tuple(segment_ids.shape)}"
            )
        self.segment_ids = segment_ids
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.sequence_parallel = sequence_parallel
        self.keep_probs = keep_probs
        self.num_segments = num_segments or segment_ids.shape[0]
        self.process_groups = process_groups
        self.records: dict[int, LayerRouting] = {}

    def __getitem__(self, layer: int) -> LayerRouting:
        if layer not in self.records:
            raise KeyError(
                f"layer {layer} was not captured on this rank (captured: {sorted(self.records)})"
            )
        return self.records[layer]

    @torch.no_grad()
    def __call__(self, layer, logits, padding_mask):
        if self.layers is not None and layer not in self.layers:
            return None
        if layer in self.records:
            raise RuntimeError(
                f"layer {layer} routed twice in one capture; use one capture per forward pass"
            )
        flat = logits.detach().reshape(-1, logits.shape[-1])
        ids = router_segment_ids(self.segment_ids, flat.shape[0], flat.device,
                                 self.sequence_parallel, self.process_groups)
        probs = torch.softmax(flat.float(), dim=-1)
        sums, counts = masked_segment_sums(probs, ids, self.num_segments)
        group = routing_reduction_group(self.process_groups)
        if group is not None:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
        self.records[layer] = LayerRouting(
            layer=layer,
            logits=flat,
            probs=probs if self.keep_probs else None,
            segment_ids=ids,
            prob_sum=sums,
            token_count=counts,
        )
        return None


@contextlib.contextmanager
def capture_routing(
    model, segment_ids: torch.Tensor, layers: Optional[Iterable[int]] = None, **kwargs
) -> Iterator[RoutingCapture]:
    """A `RoutingCapture` installed on `model`'s routers for the block; see the module
    docstring.

    Args:
        model: the model (or list of pipeline chunks) whose routers to observe.
        segment_ids: [B, S] segment ids of the model input, -1 = padding.
        layers: global 0-based layers to capture; None: all of this rank's.
        **kwargs: the other `RoutingCapture` arguments.

    Yields:
        The capture, filled by the forward passes inside the block.
    """
    capture = RoutingCapture(segment_ids, layers, **kwargs)
    with observe_routers(model, capture):
        yield capture
