"""The SARA objective: JS routing alignment to anchor priors in chosen MoE layers."""

from sara_megatron.sara.layers import select_alignment_layers
from sara_megatron.sara.loss import SaraRoutingLoss

__all__ = ["SaraRoutingLoss", "select_alignment_layers"]
