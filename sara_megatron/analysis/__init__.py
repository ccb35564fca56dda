"""Routing analyses: per-layer divergence between anchor and target languages."""

from sara_megatron.analysis.routing_divergence import format_divergence_table, routing_divergence

__all__ = ["format_divergence_table", "routing_divergence"]
