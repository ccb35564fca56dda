"""Per-layer routing divergence between each target language and its anchor, under one model.

For every sample id present in the anchor language and a target language, both sequences go
through the same model; each gives its masked sequence-mean dense routing distribution per layer
(`capture_routing`), and the JS divergence between the two is averaged over samples. This is the
paper's alignment measure: SARA should lower it in the aligned layers, full fine-tuning need not.

Runs on the current parallel state without pipeline parallel (every rank feeds the same batch; TP
and EP ranks agree on the result). Batches are padded as prior extraction pads them
(`models.longrope_padding`): with Phi-3 longrope, a sample is measured under the rope factors
training uses for it, whichever samples share its batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.kernels.routing_js_reference import js_divergence_from_mean
from sara_megatron.models.builder import causal_attention_mask
from sara_megatron.models.longrope_padding import (
    check_rope_regime,
    longrope_switch,
    regime_padded_length,
)
from sara_megatron.routing import capture_routing, segment_ids_from_padding_mask


@torch.no_grad()
def _sequence_means(model, shards: TokenShards, samples, layers, batch_size: int) -> dict:
    """sample id -> [L, N] fp32 sequence-mean routing."""
    device = next(model.parameters()).device
    switch = longrope_switch([model])
    means = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        sequences = [shards.tokens(s) for s in chunk]
        length = regime_padded_length(max(len(seq) for seq in sequences), 1, shards.seq_length,
                                      switch)
        check_rope_regime(length, shards.seq_length, switch, 1)
        packed = pack_tokens(sequences, [s.meta.prompt_length for s in chunk], seq_length=length)
        tokens = packed.tokens.to(device)
        b, s = tokens.shape
        with capture_routing(segment_ids_from_padding_mask(packed.padding_mask), layers=layers) as cap:
            model(tokens, torch.arange(s, device=device).expand(b, s), causal_attention_mask(s, device))
        stacked = torch.stack([cap[layer].seq_mean for layer in layers], dim=1)  # [B, L, N]
        for row, sample in enumerate(chunk):
            means[sample.meta.sample_id] = stacked[row].cpu()
    return means


def routing_divergence(
    model,
    shards: TokenShards,
    layers: Sequence[int],
    languages: Optional[Sequence[str]] = None,
    batch_size: int = 8,
) -> dict[str, list[float]]:
    """{target language: [mean JS(anchor ‖ target) per layer in `layers`]} under `model`, in eval
    mode (the model's mode is restored afterwards)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        return _divergence_by_language(model, shards, list(layers), languages, batch_size)
    finally:
        model.train(was_training)


def _divergence_by_language(model, shards, layers, languages, batch_size):
    anchor = _sequence_means(model, shards, shards.samples(shards.anchor_language), layers, batch_size)
    result = {}
    for language in languages or shards.target_languages:
        if language == shards.anchor_language:
            raise ValueError(f"{language!r} is the anchor language: its divergence from itself "
                             f"is 0; name target languages ({', '.join(shards.target_languages)})")
        target = _sequence_means(model, shards, shards.samples(language), layers, batch_size)
        common = sorted(set(anchor) & set(target))
        if not common:
            raise ValueError(f"no sample id of {language!r} has an anchor")
        p = torch.stack([anchor[i] for i in common])  # [S, L, N]
        q = torch.stack([target[i] for i in common])
        js = js_divergence_from_mean(p, q, torch.ones(p.shape[:2]))  # [S, L]
        result[language] = js.mean(0).tolist()
    return result


def format_divergence_table(layers: Sequence[int], columns: dict[str, dict[str, list[float]]]) -> str:
    """Rows (layer, language); one column per model, e.g. {"base": ..., "SARA": ..., "FFT": ...}."""
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
