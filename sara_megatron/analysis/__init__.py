"""Routing analyses: per-layer divergence between anchor and target languages, the alignment range
it suggests, expert usage, training dynamics, figures and the run report."""

from sara_megatron.analysis.routing_divergence import (
    format_divergence_table,
    routing_analysis,
    routing_divergence,
)

__all__ = ["format_divergence_table", "routing_analysis", "routing_divergence"]
