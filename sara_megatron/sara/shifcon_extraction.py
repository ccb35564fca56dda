"""ShifCon's offline pass: the language vectors, the mean hidden state entering chosen layers per
language over the model before fine-tuning — L2-normalised sentence means averaged, as the
authors compute them, or raw token means (`tools/extract_language_vectors.py` runs it and writes
the file of `sara/shifcon_vectors.py`)."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.routing.capture import (
    check_process_groups,
    local_token_segment_ids,
    routing_reduction_group,
)
from sara_megatron.routing.forward_runner import ForwardRunner, lay_out_rows
from sara_megatron.sara.shifcon import layer_input, segment_mean_pool, transformer_layers


def _size_and_rank(process_groups: Optional[ProcessGroupCollection], name: str) -> tuple[int, int]:
    """(size, this rank's index) of one of megatron's groups; (1, 0) for one process alone."""
    if process_groups is None:
        return 1, 0
    group = getattr(process_groups, name)
    return dist.get_world_size(group), dist.get_rank(group)


NORMALISATIONS = ("sentence_l2", "token_mean")


@torch.no_grad()
def extract_language_vectors(chunks, shards, layers: Sequence[int], languages: Sequence[str],
                             micro_batch_size: int, device, progress=None,
                             process_groups: Optional[ProcessGroupCollection] = None,
                             normalisation: str = "sentence_l2") -> dict:
    """Each language's vector entering each chosen layer, from the hidden states of its samples.

    `normalisation` says how the hidden states entering a layer make the vector:
    - `sentence_l2` (as ShifCon's authors compute them): each sample's mean over its own
      non-padding tokens, L2-normalised, then the mean over the language's samples;
    - `token_mean`: the mean over every non-padding token of the language's samples.

    The forward is the forward runner's (`routing/forward_runner.py`): padded as prior extraction
    pads (the longrope rule included, training's length being the shards' seq_length), sliced for
    context parallel, stopped after the last chosen layer. Collective over the world (any layout):
    data parallel ranks take every DP-th sample, pipeline stages their own layers, TP×CP ranks
    their part of each sequence (a sample's mean is summed over the TP×CP group before it is
    normalised); sums are all-reduced over the world before the division.

    Args:
        chunks: This rank's model chunks (megatron GPTModels); their mode is restored afterwards.
        shards: The token shards (`data.token_shards.TokenShards`).
        layers: Global 0-based layers whose input is averaged.
        languages: The languages to average, each a language of `shards`.
        micro_batch_size: Samples per forward on each data-parallel rank.
        device: Where the model runs.
        progress: Called as progress(language, step, steps) after each forward; None: silent.
        process_groups: Megatron's groups (`distributed.model_process_groups()`, read once by the
            tool); None is one process alone.
        normalisation: `sentence_l2` or `token_mean` (see above).

    Returns:
        {language: ([len(layers), H] fp32 vectors on the CPU, tokens averaged)}.

    Raises:
        ValueError: An unknown normalisation, no token of a language reached one of the layers,
            or `process_groups` is None in a world of several ranks.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    check_process_groups(process_groups, "language-vector extraction")
    runner = ForwardRunner(chunks, device, process_groups, train_length=shards.seq_length)
    modules = transformer_layers(runner.chunks)
    position = {layer: i for i, layer in enumerate(layers)}
    hidden_size = runner.chunks[0].config.hidden_size
    dp, dp_rank = _size_and_rank(process_groups, "dp")
    tp, tp_rank = _size_and_rank(process_groups, "tp")
    group = routing_reduction_group(process_groups)
    results = {}
    for language in languages:
        samples = shards.samples(language)
        mine = samples[dp_rank::dp]
        steps = -(-len(samples) // (dp * micro_batch_size))
        sums = torch.zeros(len(layers), hidden_size, dtype=torch.float64, device=device)
        tokens = torch.zeros(len(layers), dtype=torch.float64, device=device)
        sentences = torch.zeros(len(layers), dtype=torch.float64, device=device)
        state = {}

        def hook(module, args, kwargs):
            hidden = layer_input(args, kwargs)
            ids = local_token_segment_ids(state["segments"].to(hidden.device), tp > 1, tp_rank,
                                          tp)
            if ids.numel() != hidden.shape[0] * hidden.shape[1]:
                raise ValueError(f"segment ids give {ids.numel()} local tokens, the layer saw "
                                 f"{hidden.shape[0] * hidden.shape[1]}")
            row = position[module.layer_number - 1]
            valid = (ids >= 0).to(torch.float64)
            tokens[row] += valid.sum()
            if normalisation == "token_mean":
                sums[row] += (hidden.reshape(-1, hidden_size).double() * valid.unsqueeze(-1)).sum(0)
                return
            # Every rank of the TP×CP group gets each sample's whole mean, so a sample counts
            # once per rank of the group in both the world's sums and its sentence count.
            means, counts = segment_mean_pool(hidden, ids, state["samples"], group)
            real = counts > 0
            unit = torch.nn.functional.normalize(means[real].double(), dim=-1)
            sums[row] += unit.sum(0)
            sentences[row] += real.sum()

        handles = [modules[layer].register_forward_pre_hook(hook, with_kwargs=True)
                   for layer in layers if layer in modules]

        @contextlib.contextmanager
        def observe(index, inputs, rows):
            state["segments"], state["samples"] = inputs.segment_ids, rows.samples
            yield

        try:
            for step in range(steps):
                chunk_samples = mine[step * micro_batch_size:(step + 1) * micro_batch_size]
                rows = [[shards.tokens(s)] for s in chunk_samples]
                rows += [[]] * (micro_batch_size - len(rows))  # all-padding rows
                longest = max([len(row[0]) for row in rows if row] + [1])
                laid = lay_out_rows(rows, runner.padded_length(longest), packed=False)
                runner.run([laid], observe, stop_after=max(layers))
                if progress:
                    progress(language, step + 1, steps)
        finally:
            for handle in handles:
                handle.remove()
        dist.all_reduce(sums)
        dist.all_reduce(tokens)
        dist.all_reduce(sentences)
        if torch.any(tokens == 0):
            raise ValueError(f"language {language}: no token reached layers "
                             f"{[layers[i] for i in torch.nonzero(tokens == 0)[:, 0].tolist()]}")
        divisor = tokens if normalisation == "token_mean" else sentences
        results[language] = ((sums / divisor.unsqueeze(-1)).float().cpu(),
                             int(tokens[0].item()))
    return results
