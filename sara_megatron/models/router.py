"""Megatron-Core routers that expose their logits to `sara_megatron.routing` observers."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

from sara_megatron.routing.observers import notify_router_logits


class ObservedTopKRouter(TopKRouter):
    """`TopKRouter` whose gating logits are shown to router observers before top-k routing.

    Routing itself is Megatron's, untouched: with no observer registered this is TopKRouter.
    """

    @property
    def global_layer_index(self) -> int:
        # TransformerLayer sets a 1-based layer number that already includes the pipeline offset.
        if self.layer_number is None:
            raise RuntimeError("router has no layer number; build it inside a TransformerLayer")
        return self.layer_number - 1

    def observe_and_attach(self, logits, padding_mask, probs):
        """Show `logits` to the observers and attach the losses they return to `probs`."""
        for loss in notify_router_logits(self.global_layer_index, logits, padding_mask):
            probs = MoEAuxLossAutoScaler.apply(probs, loss)
        return probs

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        return self.observe_and_attach(logits, padding_mask, probs), routing_map
