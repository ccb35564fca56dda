"""Megatron-Core routers that expose their logits to the observers installed on them
(`sara_megatron.routing.observe_routers`)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

from sara_megatron.compat.megatron_versions import (
    fit_aux_loss_tracker,
    lb_reduce_group_has_dp,
    lb_token_count_argument,
)


class ObservedTopKRouter(TopKRouter):
    """`TopKRouter` whose gating logits are shown to router observers before top-k routing.

    Routing itself is Megatron's, untouched: with no observer installed this is TopKRouter. The
    observers are this router's own (`routing.observe_routers` installs them per model).
    """

    router_observers: tuple = ()

    @property
    def global_layer_index(self) -> int:
        """The router's global 0-based layer index (HF `model.layers.i`).

        Raises:
            RuntimeError: the router was built outside a TransformerLayer (no layer number).
        """
        # TransformerLayer sets a 1-based layer number that already includes the pipeline offset.
        if self.layer_number is None:
            raise RuntimeError("router has no layer number; build it inside a TransformerLayer")
        return self.layer_number - 1

    def observe_and_attach(self, logits, padding_mask, probs):
        """Show `logits` to the observers and attach the losses they return to `probs`.

        Args:
            logits: [S, B, N] router logits.
            padding_mask: [S, B] bool, True = padding, or None.
            probs: [S·B, N] routing probabilities.

        Returns:
            `probs`, carrying each returned loss through `MoEAuxLossAutoScaler`.
        """
        for observer in self.router_observers:
            loss = observer(self.global_layer_index, logits, padding_mask)
            if loss is not None:
                probs = MoEAuxLossAutoScaler.apply(probs, loss)
        return probs

    def attach_and_log_load_balancing_loss(
        self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
        valid_token_count=None, **group_kwargs,
    ):
        """Megatron's, with the per-token-loss scale made independent of TP and CP.

        The load-balancing gradient must be scaled by the micro-batch's token count over the
        TP×CP group. megatron-core up to 0.18 uses this rank's count without a padding mask
        (1/(TP·CP) too small under sequence or context parallel); 0.19 multiplies the count by
        the group size, which with a padding mask multiplies a count that is already the
        group's. This hands megatron whatever makes the scale the group's count on the
        installed version (`compat.megatron_versions`, docs/compatibility.md).

        Args:
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group: as megatron's
                `TopKRouter.attach_and_log_load_balancing_loss`.
            valid_token_count: megatron's token count (None, an int, or a 0-d tensor that is
                already the group's); replaced by the group's count under per-token loss.
            group_kwargs: megatron's data-parallel flag for the reduce group, under whichever
                name the installed version uses (`reduce_group_has_dp` / `needs_dp_avg`).
        """
        if self.calculate_per_token_loss and not lb_reduce_group_has_dp(group_kwargs):
            group_count = _group_token_count(activation, valid_token_count, reduce_group)
            valid_token_count = lb_token_count_argument(group_count, reduce_group.size())
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        fit_aux_loss_tracker(aux_loss_name, num_layers)
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            valid_token_count=valid_token_count, **group_kwargs,
        )

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron's top-k routing, then the observers (`observe_and_attach`).

        Args:
            logits: [S, B, N] router logits.
            padding_mask: [S, B] bool, True = padding, or None.

        Returns:
            (probs [S·B, N], routing_map [S·B, N] bool), as megatron's `TopKRouter.routing`.
        """
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        return self.observe_and_attach(logits, padding_mask, probs), routing_map


def _group_token_count(activation, valid_token_count, reduce_group):
    """The micro-batch's token count over `reduce_group` (the TP×CP ranks that split it).

    Without a padding mask megatron passes this rank's count (a Python int, or None for
    activation.shape[0]); every rank of the group holds as many tokens, so the total is that
    times the group size. With a padding mask it passes a 0-d tensor that is already the group's
    non-padding total: `get_tokens_per_expert_and_token_count` derives it from the per-expert
    counts after all-reducing those in place over the group (every version in range). The
    TP / CP runs in tests/test_training.py follow the single-rank one and catch a change.
    """
    if isinstance(valid_token_count, torch.Tensor):
        return valid_token_count
    local = activation.shape[0] if valid_token_count is None else valid_token_count
    return local * reduce_group.size()
