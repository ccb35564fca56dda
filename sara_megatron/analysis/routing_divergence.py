"""Per-layer routing divergence between each target language and its anchor, under one model.

For every parallel group present in the anchor and a target language, both sequences go through
the same model; the JS divergence between their masked sequence-mean dense routing distributions
(`capture_routing`) is averaged over groups, per layer, beside the entropy-normalised JS and, on
request, each language's expert usage. A ShifCon model is measured as it was trained (each
language's hidden states shifted by its vectors). Runs on the current parallel state without
pipeline parallel, every rank feeding the same batch, through the forward runner
(`routing/forward_runner.py`). Details: docs/analysis.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import torch

from sara_megatron.analysis.parallel_set import ParallelSequence, as_parallel_set
from sara_megatron.kernels.routing_js_reference import js_divergence_from_mean
from sara_megatron.routing import capture_routing
from sara_megatron.routing.capture import masked_segment_sums, routing_reduction_group
from sara_megatron.routing.forward_runner import ForwardRunner, lay_out_rows


@dataclasses.dataclass
class SequenceRouting:
    """One sequence's routing per measured layer.

    Attributes:
        mean: `[layers, experts]` masked sequence-mean dense routing, fp32.
        selection: `[layers, experts]` share of the tokens whose top-k holds each expert; None
            without top_k.
    """

    mean: torch.Tensor  # [L, N] masked sequence-mean dense routing (fp32)
    selection: Optional[torch.Tensor]  # [L, N] share of the tokens whose top-k holds each expert


@torch.no_grad()
def _sequence_routing(model, data, sequences: list[ParallelSequence], layers, batch_size: int,
                      top_k: Optional[int] = None, process_groups=None
                      ) -> dict[str, SequenceRouting]:
    """group id -> the sequence's routing per layer."""
    device = next(model.parameters()).device
    runner = ForwardRunner([model], device, process_groups, train_length=data.seq_length)
    out = {}
    # Longest first, so a batch pads to the length of sequences like its own, not to the set's
    # longest; a sequence's routing does not depend on its batch-mates (causal attention).
    tokens_of = {id(s): data.tokens(s) for s in sequences}
    sequences = sorted(sequences, key=lambda s: len(tokens_of[id(s)]), reverse=True)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        token_lists = [tokens_of[id(s)] for s in chunk]
        # every rank feeds the same batch: no agreement over ranks needed
        length = runner.padded_length(max(len(seq) for seq in token_lists), agree=False)
        rows = lay_out_rows([[seq] for seq in token_lists], length, packed=False)
        b = len(chunk)
        captured = {}

        @contextlib.contextmanager
        def observe(index, inputs, rows):
            with capture_routing(model, inputs.segment_ids, layers=layers,
                                 process_groups=process_groups) as capture:
                yield
            captured.update(capture.records)

        runner.run([rows], observe, stop_after=max(layers))
        cap = captured
        means = torch.stack([cap[layer].seq_mean for layer in layers], dim=1)  # [B, L, N]
        selections = None
        if top_k is not None:
            per_layer = []
            for layer in layers:
                record = cap[layer]
                chosen = torch.zeros_like(record.logits, dtype=torch.float32)
                chosen.scatter_(1, record.logits.topk(top_k, dim=-1).indices, 1.0)
                sums, counts = masked_segment_sums(chosen, record.segment_ids, b)
                group = routing_reduction_group(process_groups)  # a sequence spans TP x CP
                if group is not None:
                    torch.distributed.all_reduce(sums, group=group)
                    torch.distributed.all_reduce(counts, group=group)
                per_layer.append(sums / counts.clamp_min(1.0).unsqueeze(-1))
            selections = torch.stack(per_layer, dim=1)  # [B, L, N]
        for row, sequence in enumerate(chunk):
            out[sequence.group_id] = SequenceRouting(
                means[row].cpu(), None if selections is None else selections[row].cpu())
    return out


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dim, 0·log0 = 0, in float64.

    Args:
        p: Probabilities, `[..., n]`.

    Returns:
        float64 `[...]`.
    """
    p = p.double()
    return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)


@dataclasses.dataclass
class RoutingAnalysis:
    """What `routing_analysis` measured.

    Attributes:
        layers: The measured layers.
        anchor: The anchor language.
        divergence: {target language: mean over groups of JS(anchor ‖ target), per layer}.
        normalized: {target language: mean over groups of JS / mean entropy of the two, per
            layer}.
        groups: {target language: parallel groups compared}.
        mean_probability: {language (anchor included): `[layers][experts]` mean over its
            sequences of the dense routing}, when top_k was given.
        selection_frequency: {language: `[layers][experts]` mean top-k selection share}, when
            top_k was given.
        top_k: The top-k of the selection share, or None.
    """

    layers: list[int]
    anchor: str
    divergence: dict[str, list[float]]  # language -> mean over groups of JS(anchor ‖ target)
    normalized: dict[str, list[float]]  # mean over groups of JS / mean entropy of the two
    groups: dict[str, int]  # language -> parallel groups compared
    # language (anchor included) -> [L][N] means over its sequences, when top_k was given
    mean_probability: Optional[dict[str, list[list[float]]]] = None
    selection_frequency: Optional[dict[str, list[list[float]]]] = None
    top_k: Optional[int] = None


def routing_analysis(
    model,
    data,
    layers: Sequence[int],
    languages: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    top_k: Optional[int] = None,
    progress=None,
    process_groups=None,
    shift=None,
) -> RoutingAnalysis:
    """Per-layer divergence of each target language from the anchor on a parallel set (or token
    shards), plain and entropy-normalised; with `top_k`, also each language's expert usage (mean
    dense routing probability and top-k selection share per expert). Eval mode; the model's mode
    is restored afterwards.

    Args:
        model: The Megatron model (no pipeline parallel).
        data: A parallel set or token shards.
        layers: The measured layers (global, 0-based).
        languages: The target languages; None: the set's.
        batch_size: Sequences per forward.
        top_k: Measure expert usage with this top-k; None: do not.
        progress: Called as `progress(language)` after each language's passes; None: not.
        process_groups: Megatron's (`distributed.model_process_groups()`); None for one process.
        shift: A ShifCon run's `language_shift.LanguageShift`, applied per language; None: none.

    Returns:
        The analysis.

    Raises:
        ValueError: `batch_size` < 1, a target language is the anchor, or no sample of a target
            language has an anchor.
    """
    from sara_megatron.sara.language_shift import shifted
    from sara_megatron.sara.shifcon import transformer_layers

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = as_parallel_set(data)
    layers = list(layers)
    targets = list(languages or data.target_languages)
    for language in targets:
        if language == data.anchor_language:
            raise ValueError(f"{language!r} is the anchor language: its divergence from itself "
                             f"is 0; name target languages ({', '.join(data.target_languages)})")
    was_training = model.training
    model.eval()
    try:
        routing = {}
        for language in [data.anchor_language, *targets]:
            with shifted(transformer_layers([model]), shift, language):
                routing[language] = _sequence_routing(model, data, data.sequences(language),
                                                      layers, batch_size, top_k, process_groups)
            if progress is not None:
                progress(language)
    finally:
        model.train(was_training)
    result = RoutingAnalysis(layers, data.anchor_language, {}, {}, {}, top_k=top_k)
    anchor = routing[data.anchor_language]
    for language in targets:
        target = routing[language]
        common = sorted(set(anchor) & set(target))
        if not common:
            raise ValueError(f"no sample id of {language!r} has an anchor")
        p = torch.stack([anchor[i].mean for i in common])  # [S, L, N]
        q = torch.stack([target[i].mean for i in common])
        js = js_divergence_from_mean(p, q, torch.ones(p.shape[:2]))  # [S, L]
        mean_entropy = 0.5 * (entropy(p) + entropy(q))
        normalized = torch.where(mean_entropy > 0, js / mean_entropy.clamp_min(1e-300), 0.0)
        result.divergence[language] = js.mean(0).tolist()
        result.normalized[language] = normalized.mean(0).tolist()
        result.groups[language] = len(common)
    if top_k is not None:
        result.mean_probability, result.selection_frequency = {}, {}
        for language, by_group in routing.items():
            rows = list(by_group.values())
            result.mean_probability[language] = torch.stack([r.mean for r in rows]).mean(0).tolist()
            result.selection_frequency[language] = (
                torch.stack([r.selection for r in rows]).mean(0).tolist())
    return result


def routing_divergence(
    model,
    shards,
    layers: Sequence[int],
    languages: Optional[Sequence[str]] = None,
    batch_size: int = 8,
) -> dict[str, list[float]]:
    """The divergence part of `routing_analysis`, in eval mode (the model's mode is restored
    afterwards).

    Args:
        model: The Megatron model, on one process.
        shards: Token shards or a parallel set.
        layers: The measured layers (global, 0-based).
        languages: The target languages; None: the set's.
        batch_size: Sequences per forward.

    Returns:
        {target language: [mean JS(anchor ‖ target) per layer in `layers`]}.
    """
    return routing_analysis(model, shards, layers, languages, batch_size).divergence


def format_divergence_table(layers: Sequence[int], columns: dict[str, dict[str, list[float]]]) -> str:
    """Rows (layer, language), then the per-language means; one column per model.

    Args:
        layers: The measured layers.
        columns: {model name: {language: one value per layer}}, e.g. {"base": ..., "SARA": ...}.

    Returns:
        The table as fixed-width text.
    """
    names = list(columns)
    languages = list(next(iter(columns.values())))
    head = f"{'layer':>5} {'lang':>4} " + " ".join(f"{n:>11}" for n in names)
    lines = [head, "-" * len(head)]
    for li, layer in enumerate(layers):
        for lang in languages:
            lines.append(f"{layer:>5} {lang:>4} " + " ".join(
                f"{columns[n][lang][li]:>11.3e}" for n in names))
    for lang in languages:
        lines.append(f"{'mean':>5} {lang:>4} " + " ".join(
            f"{sum(columns[n][lang]) / len(layers):>11.3e}" for n in names))
    return "\n".join(lines)
