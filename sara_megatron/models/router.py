"""Megatron-Core routers that expose their logits to the observers installed on them
(`sara_megatron.routing.observe_routers`)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter


class ObservedTopKRouter(TopKRouter):
    """`TopKRouter` whose gating logits are shown to router observers before top-k routing.

    Routing itself is Megatron's, untouched: with no observer installed this is TopKRouter. The
    observers are this router's own (`routing.observe_routers` installs them per model).
    """

    router_observers: tuple = ()

    @property
    def global_layer_index(self) -> int:
        # TransformerLayer sets a 1-based layer number that already includes the pipeline offset.
        if self.layer_number is None:
            raise RuntimeError("router has no layer number; build it inside a TransformerLayer")
        return self.layer_number - 1

    def observe_and_attach(self, logits, padding_mask, probs):
        """Show `logits` to the observers and attach the losses they return to `probs`."""
        for observer in self.router_observers:
            loss = observer(self.global_layer_index, logits, padding_mask)
            if loss is not None:
                probs = MoEAuxLossAutoScaler.apply(probs, loss)
        return probs

    def attach_and_log_load_balancing_loss(
        self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
        reduce_group_has_dp=False, valid_token_count=None,
    ):
        """Megatron's, with the per-token-loss scale made independent of TP and CP.

        megatron-core 0.16.1 scales each rank's share of the load-balancing loss by the rank's own
        token count where the group's is right, so under sequence or context parallel the
        gradient shrinks by 1/(TP·CP); this passes the group's count (docs/models.md).
        """
        if self.calculate_per_token_loss and not reduce_group_has_dp:
            valid_token_count = _group_token_count(activation, valid_token_count, reduce_group)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        _fit_logging_tracker(aux_loss_name, num_layers)
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count,
        )

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        return self.observe_and_attach(logits, padding_mask, probs), routing_map


def _fit_logging_tracker(name: str, num_layers: int) -> None:
    """Grow megatron's process-wide per-layer loss tracker to this model's layer count: it is sized
    by the first model that logs to it, and a deeper model built later in the same process (a
    test, a benchmark, an analysis beside training) would index past its end."""
    entry = get_moe_layer_wise_logging_tracker().get(name)
    if entry is not None and entry["values"].numel() < num_layers:
        values = entry["values"]
        entry["values"] = torch.cat([values, values.new_zeros(num_layers - values.numel())])


def _group_token_count(activation, valid_token_count, reduce_group):
    """The micro-batch's token count over `reduce_group` (the TP×CP ranks that split it).

    Without a padding mask megatron passes this rank's count (a Python int, or None for
    activation.shape[0]); every rank of the group holds as many tokens, so the total is that
    times the group size. With a padding mask it passes a 0-d tensor that is already the group's
    non-padding total: `get_tokens_per_expert_and_token_count` derives it from the per-expert
    counts after all-reducing those in place over the group (megatron-core 0.16.1). The
    TP / CP runs in tests/test_training.py follow the single-rank one and catch a change.
    """
    if isinstance(valid_token_count, torch.Tensor):
        return valid_token_count
    local = activation.shape[0] if valid_token_count is None else valid_token_count
    return local * reduce_group.size()
