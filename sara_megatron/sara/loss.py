"""The SARA routing-alignment loss, computed inside each chosen MoE layer.

For each selected layer l and sequence b of the micro-batch:
    JS(P̄_anchor[l, b] ‖ Q̄_l[b]),  Q̄ = masked sequence-mean of the dense fp32 routing softmax,
and L_JS = mean over selected layers and valid (non-empty) sequences. `SaraRoutingLoss` is a router
observer (`sara_megatron.routing.observe_routers`) whose term the router attaches with megatron's
`MoEAuxLossAutoScaler`, so pipeline stages handle their own layers. Under megatron's per-token
loss the trainer's `sequence_weight` makes the update λ·L_JS over the global batch's sequences
however it is cut into micro-batches; under sequence / context parallel the masked sums are
all-reduced over TP×CP before the divergence (docs/training.md, docs/kernel.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference
from sara_megatron.kernels.routing_js_reference import DIVERGENCES
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.routing.capture import (
    check_process_groups,
    router_segment_ids,
    routing_reduction_group,
)


class SaraRoutingLoss:
    """Router observer computing λ_JS·L_JS for the current micro-batch (see module docstring).

    Call `set_batch` before each micro-batch's forward; the trainer sets `sequence_weight`
    (loss tokens / valid sequences of the global batch) under megatron's per-token loss, None
    takes the mean over the micro-batch's valid sequences.

    Args:
        layers: global 0-based indices of the aligned layers (the priors' first axis, sorted).
        coeff: λ_JS (>= 0); 0 runs the same code and adds zero gradients.
        sequence_parallel: whether the router sees this TP rank's sequence shard.
        impl: the JS kernel: "auto", "triton" or "reference" (`kernels.sequence_routing_js`).
        divergence: one of `DIVERGENCES` ("js" is the paper's; the others run the reference).
        process_groups: megatron's groups; None only in a one-process world.

    Raises:
        ValueError: an unknown divergence, the Triton kernel with a divergence other than JS,
            no layers, a negative coefficient, or no `process_groups` on several ranks.
    """

    def __init__(
        self,
        layers: Sequence[int],
        coeff: float,
        *,
        sequence_parallel: bool = False,
        impl: str = "auto",
        divergence: str = "js",
        process_groups: Optional[ProcessGroupCollection] = None,
    ):
        check_process_groups(process_groups, "the SARA loss")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        if divergence != "js" and impl == "triton":
            raise ValueError(f"the fused Triton kernel computes JS only; divergence {divergence!r} "
                             "runs the PyTorch reference: use impl auto or reference")
        if not layers:
            raise ValueError("SARA needs at least one alignment layer")
        if coeff < 0:
            raise ValueError(f"λ_JS must be >= 0, got {coeff}")
        self.layers = sorted(int(i) for i in layers)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.coeff = float(coeff)
        self.sequence_parallel = sequence_parallel
        self.process_groups = process_groups
        # None: mean over the micro-batch's valid sequences; else Σ_b JS_b × weight (see above).
        self.sequence_weight: Optional[float] = None
        self.impl = impl
        self.divergence = divergence
        self._priors: Optional[torch.Tensor] = None
        self._segment_ids: Optional[torch.Tensor] = None
        self.reset_stats()

    def reset_stats(self) -> None:
        """Per-layer sums for logging: Σ JS over valid sequences, and their number. Kept as
        tensors on the logits' device so the hot path never waits for the host."""
        self.js_sum: dict[int, torch.Tensor] = {}
        self.sequences: dict[int, torch.Tensor] = {}

    def set_batch(self, priors: torch.Tensor, segment_ids: torch.Tensor,
                  packed: bool = False) -> None:
        """Set the micro-batch's priors and segment ids for the next forward.

        Args:
            priors: [L_sel, B, N] anchor routing distributions aligned with `self.layers`
                (cast to fp32); packed: [L_sel, n, N] for the micro-batch's n samples.
            segment_ids: [B, S] model-input segment ids, -1 = padding; packed: [rows, S] in
                [-1, n).
            packed: the rows hold several samples (data/packing.py).

        Raises:
            ValueError: shapes that do not fit `self.layers` or each other, or segment ids out
                of range.
        """
        if priors.dim() != 3 or priors.shape[0] != len(self.layers):
            raise ValueError(
                f"priors must be [L_sel={len(self.layers)}, B, N], got {tuple(priors.shape)}"
            )
        if segment_ids.dim() != 2 or (not packed and segment_ids.shape[0] != priors.shape[1]):
            raise ValueError(
                f"segment ids must be [B={priors.shape[1]}, S], got {tuple(segment_ids.shape)}"
            )
        # Checked here, once per micro-batch, so the kernel need not synchronise per layer.
        if segment_ids.numel() and not (
            (segment_ids >= -1).all() and (segment_ids < priors.shape[1]).all()
        ):
            raise ValueError(f"segment ids must lie in [-1, {priors.shape[1]})")
        self._priors = priors.float()
        self._segment_ids = segment_ids

    def layer_means(self) -> dict[int, float]:
        """Mean JS per layer over the sequences seen since `reset_stats` (this rank's layers).

        Returns:
            {global layer: mean JS}, for the aligned layers this rank's stage has run.
        """
        return {
            layer: float(self.js_sum[layer] / self.sequences[layer].clamp_min(1))
            for layer in self.js_sum
        }

    def __call__(self, layer: int, logits: torch.Tensor, padding_mask) -> Optional[torch.Tensor]:
        if layer not in self.index:
            return None
        if self._priors is None:
            raise RuntimeError("SaraRoutingLoss.set_batch was not called for this micro-batch")
        flat = logits.reshape(-1, logits.shape[-1])
        ids = router_segment_ids(self._segment_ids, flat.shape[0], logits.device,
                                 self.sequence_parallel, self.process_groups)
        prior = self._priors[self.index[layer]].to(logits.device)
        group = routing_reduction_group(self.process_groups)
        if self.divergence == "js":
            js, counts = sequence_routing_js(
                flat, ids, prior, process_group=group, return_counts=True,
                validate=False, impl=self.impl,
            )
        else:
            js, counts = sequence_routing_js_reference(
                flat, ids, prior, process_group=group, return_counts=True,
                validate=False, divergence=self.divergence,
            )
        valid = counts > 0
        num_valid = valid.sum()
        js_sum = (js * valid).sum()
        layer_js = js_sum / num_valid.clamp_min(1)
        self.js_sum[layer] = self.js_sum.get(layer, 0) + js_sum.detach()
        self.sequences[layer] = self.sequences.get(layer, 0) + num_valid
        if self.sequence_weight is None:
            return layer_js * (self.coeff / len(self.layers))
        return js_sum * (self.coeff * self.sequence_weight / len(self.layers))

    def reduced_layer_means(self, num_layers: int) -> dict[int, float]:
        """Mean JS per aligned layer over every sequence since `reset_stats`, on every rank:
        sums over data parallel and pipeline stages (each stage holds its own layers).

        Collective over the data-parallel and pipeline groups.

        Args:
            num_layers: the model's layer count (width of the reduced table).

        Returns:
            {aligned global layer: mean JS}; 0 for a layer no sequence reached.
        """
        import torch.distributed as dist

        # NCCL groups take CUDA tensors; a stage with no aligned layer has no stats to copy from.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        table = torch.zeros(2, num_layers, dtype=torch.float64, device=device)
        for layer, value in self.js_sum.items():
            table[0, layer] = value.double()
            table[1, layer] = self.sequences[layer].double()
        if self.process_groups is not None:
            dist.all_reduce(table, group=self.process_groups.dp)
            dist.all_reduce(table, group=self.process_groups.pp)
        return {l: float(table[0, l] / table[1, l].clamp_min(1)) for l in self.layers}
