"""A readable dense-routing report: per layer and sequence, tokens, entropy and top experts."""

from __future__ import annotations

import math

import torch

from sara_megatron.routing.capture import RoutingCapture


def routing_rows(capture: RoutingCapture, sequence_offset: int = 0, top: int = 3) -> list[dict]:
    """One row per (captured layer, non-empty sequence), as plain Python values.

    Args:
        capture: a finished `RoutingCapture`.
        sequence_offset: added to each batch row's index (to number sequences across batches).
        top: how many of the most-used experts each row lists.

    Returns:
        Dicts with `layer`, `sequence`, `tokens` (valid tokens), `entropy` (nats, of the
        sequence-mean distribution) and `top` ([(expert, mean probability)], most used first),
        in layer order.
    """
    rows = []
    for layer in sorted(capture.records):
        rec = capture.records[layer]
        for b in range(rec.prob_sum.shape[0]):
            if rec.empty[b]:
                continue
            mean = rec.seq_mean[b]
            entropy = -(mean * mean.clamp_min(1e-30).log()).sum().item()
            values, experts = mean.topk(min(top, mean.numel()))
            rows.append(
                dict(
                    layer=layer,
                    sequence=sequence_offset + b,
                    tokens=int(rec.token_count[b].item()),
                    entropy=entropy,
                    top=[(int(e), float(v)) for e, v in zip(experts, values)],
                )
            )
    return rows


def format_routing_report(rows: list[dict], num_experts: int) -> str:
    """A fixed-width table; entropy is also shown against the uniform maximum log(N).

    Args:
        rows: `routing_rows` output (printed sorted by layer, then sequence).
        num_experts: N, for the normalised entropy column.
    """
    head = f"{'layer':>5} {'seq':>4} {'tokens':>6} {'entropy':>8} {'/log N':>6}  top experts (p)"
    lines = [head, "-" * len(head)]
    max_entropy = math.log(num_experts)
    for r in sorted(rows, key=lambda r: (r["layer"], r["sequence"])):
        top = "  ".join(f"{e:>3}:{p:.3f}" for e, p in r["top"])
        lines.append(
            f"{r['layer']:>5} {r['sequence']:>4} {r['tokens']:>6} {r['entropy']:>8.4f} "
            f"{r['entropy'] / max_entropy:>6.3f}  {top}"
        )
    return "\n".join(lines)
