"""ShifCon's offline pass: the language vectors, the mean hidden state entering chosen layers per
language over the model before fine-tuning (`tools/extract_language_vectors.py` runs it and writes
the file of `sara/shifcon_vectors.py`)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.routing.capture import check_process_groups
from sara_megatron.sara.shifcon import layer_input, local_valid_tokens, transformer_layers


def _size_and_rank(process_groups: Optional[ProcessGroupCollection], name: str) -> tuple[int, int]:
    """(size, this rank's index) of one of megatron's groups; (1, 0) for one process alone."""
    if process_groups is None:
        return 1, 0
    group = getattr(process_groups, name)
    return dist.get_world_size(group), dist.get_rank(group)


@torch.no_grad()
def extract_language_vectors(chunks, shards, layers: Sequence[int], languages: Sequence[str],
                             micro_batch_size: int, device, progress=None,
                             process_groups: Optional[ProcessGroupCollection] = None) -> dict:
    """The mean hidden state entering each chosen layer, per language, over every non-padding
    token of the language's samples.

    Collective over the world (any layout): data parallel ranks take every DP-th sample, pipeline
    stages their own layers, TP×CP ranks their part of each sequence; sums are all-reduced over the
    world before the division.

    Args:
        chunks: This rank's model chunks (megatron GPTModels), set to eval mode here.
        shards: The token shards (`data.token_shards.TokenShards`).
        layers: Global 0-based layers whose input is averaged.
        languages: The languages to average, each a language of `shards`.
        micro_batch_size: Samples per forward on each data-parallel rank.
        device: Where the model runs.
        progress: Called as progress(language, step, steps) after each forward; None: silent.
        process_groups: Megatron's groups (`distributed.model_process_groups()`, read once by the
            tool); None is one process alone.

    Returns:
        {language: ([len(layers), H] fp32 mean hidden states on the CPU, tokens averaged)}.

    Raises:
        ValueError: No token of a language reached one of the layers, or `process_groups` is None
            in a world of several ranks.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sara_megatron.data.batch import pack_tokens
    from sara_megatron.models.builder import causal_attention_mask
    from sara_megatron.models.context_parallel import context_parallel_slice

    check_process_groups(process_groups, "language-vector extraction")
    modules = transformer_layers(chunks)
    position = {layer: i for i, layer in enumerate(layers)}
    hidden_size = chunks[0].config.hidden_size
    dp, dp_rank = _size_and_rank(process_groups, "dp")
    cp, cp_rank = _size_and_rank(process_groups, "cp")
    tp, _ = _size_and_rank(process_groups, "tp")
    multiple = 2 * cp * tp if cp > 1 else tp
    for chunk in chunks:
        chunk.eval()
    results = {}
    for language in languages:
        samples = shards.samples(language)
        mine = samples[dp_rank::dp]
        steps = -(-len(samples) // (dp * micro_batch_size))
        sums = torch.zeros(len(layers), hidden_size, dtype=torch.float64, device=device)
        counts = torch.zeros(len(layers), dtype=torch.float64, device=device)
        state = {}

        def hook(module, args, kwargs):
            hidden = layer_input(args, kwargs)
            valid = local_valid_tokens(state["padding"], hidden.shape[0] * hidden.shape[1], hidden.device,
                                 process_groups)
            row = position[module.layer_number - 1]
            sums[row] += (hidden.double() * valid.unsqueeze(-1)).sum((0, 1))
            counts[row] += valid.sum()

        handles = [modules[layer].register_forward_pre_hook(hook, with_kwargs=True)
                   for layer in layers if layer in modules]
        try:
            for step in range(steps):
                chunk_samples = mine[step * micro_batch_size:(step + 1) * micro_batch_size]
                sequences = [shards.tokens(s) for s in chunk_samples]
                sequences += [np.zeros(0, dtype=np.int64)] * (micro_batch_size - len(sequences))
                longest = max(max(len(s) for s in sequences), 1)
                length = torch.tensor([-(-longest // multiple) * multiple], device=device)
                dist.all_reduce(length, op=dist.ReduceOp.MAX)
                packed = pack_tokens(sequences, [0] * len(sequences), seq_length=int(length))
                tokens, padding = packed.tokens.to(device), packed.padding_mask.to(device)
                positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
                if cp > 1:
                    tokens, padding, positions = (context_parallel_slice(t, cp_rank, cp)
                                                  for t in (tokens, padding, positions))

                def forward_step(data_iterator, model, tokens=tokens, padding=padding,
                                 positions=positions):
                    next(data_iterator)
                    state["padding"] = padding
                    out = model(tokens, positions, causal_attention_mask(tokens.shape[1], device),
                                labels=tokens)
                    return out, lambda t: (t.float().sum() * 0, torch.ones((), dtype=torch.int), {})

                get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=[iter([0]) for _ in chunks] if len(chunks) > 1 else iter([0]),
                    model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
                    seq_length=int(length), micro_batch_size=micro_batch_size, forward_only=True,
                )
                if progress:
                    progress(language, step + 1, steps)
        finally:
            for handle in handles:
                handle.remove()
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        if torch.any(counts == 0):
            raise ValueError(f"language {language}: no token reached layers "
                             f"{[layers[i] for i in torch.nonzero(counts == 0)[:, 0].tolist()]}")
        results[language] = ((sums / counts.unsqueeze(-1)).float().cpu(), int(counts[0].item()))
    return results
