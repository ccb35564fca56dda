"""ShifCon (Zhang et al., 2025) as a baseline objective: shift, contrast, shift back.

    language vectors   v_lang[l] = mean hidden state entering layer l over every non-padding
                       token of the language's samples (an offline pass, `extract_language_vectors`)
    shift              entering layer a:  h ← h + (v_anchor[a] − v_lang[a])   (non-anchor samples)
    shift back         entering layer b:  h ← h − (v_anchor[b] − v_lang[b])
    contrast           on the mean-pooled (non-padding) hidden state entering layer b — the last
                       representation in the shifted area — an InfoNCE loss between a sample and
                       its anchor translation, with the other anchors of the step's micro-batch
                       (over data parallel) as negatives: −log softmax_j(cos(z_b, a_j)/τ)[b]
    L = CE + λ_LB·LB + λ_con · mean over non-anchor sequences of the InfoNCE term

The anchor representations come from a forward of the anchor rows in the same step (eval mode,
no gradient, no shift: `run_anchor_forward`, as for online priors), so only the translated side
is trained by the contrastive term (the anchor side is a moving target, as SARA's priors are
fixed ones). Anchor-language samples (`data.languages: all`) are neither shifted nor contrasted.

How it sits in megatron: forward pre-hooks on the TransformerLayers a and b of whichever pipeline
stage holds them; the contrastive loss rides on layer b's input with `MoEAuxLossAutoScaler`, as
SARA's term rides on the routing probabilities. Under sequence or context parallel the pooled sums
are all-reduced over the TP×CP group (identity backward) before the loss, every rank of the group
attaches the same value and each rank's tokens get the single-rank gradient. Scaling follows
SARA's: with `sequence_weight = T / V` set by the trainer each step the term is λ_con times the
mean over the global batch's contrasted sequences, however the batch is cut into micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.io import commit_file, temporary_path
from sara_megatron.routing.capture import local_token_segment_ids, routing_reduction_group
from sara_megatron.sara.reduction import all_reduce_identity_backward

FORMAT = "sara-language-vectors-1"


# --- language vectors on disk --------------------------------------------------------------------


@dataclasses.dataclass
class LanguageVectors:
    layers: tuple[int, ...]  # global 0-based layer whose input each row describes
    vectors: dict[str, torch.Tensor]  # language -> [len(layers), H] fp32
    anchor_language: str
    model_fingerprint: str
    tokens: dict[str, int]  # language -> tokens averaged

    def at(self, language: str, layer: int) -> torch.Tensor:
        if language not in self.vectors:
            raise KeyError(f"no language vector for {language!r} (have {sorted(self.vectors)})")
        if layer not in self.layers:
            raise KeyError(f"language vectors hold layers {list(self.layers)}, not {layer}")
        return self.vectors[language][self.layers.index(layer)]


def save_language_vectors(path: str, vectors: LanguageVectors) -> None:
    """One safetensors file (tensors named by language, metadata as JSON), written atomically."""
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "layers": json.dumps(list(vectors.layers)),
                "anchor_language": vectors.anchor_language,
                "model_fingerprint": vectors.model_fingerprint,
                "tokens": json.dumps(vectors.tokens)}
    tmp = temporary_path(path)
    save_file({lang: v.float().clone().contiguous() for lang, v in vectors.vectors.items()}, tmp,
              metadata=metadata)
    commit_file(tmp, path)


def load_language_vectors(path: str) -> LanguageVectors:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"language vectors {path}: no such file "
                                "(tools/extract_language_vectors.py writes it)")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a language-vector file of format {FORMAT} "
                             f"(format {metadata.get('format')!r})")
        vectors = {name: f.get_tensor(name) for name in f.keys()}
    return LanguageVectors(tuple(json.loads(metadata["layers"])), vectors,
                           metadata["anchor_language"], metadata["model_fingerprint"],
                           json.loads(metadata["tokens"]))


# --- hooks on transformer layers -----------------------------------------------------------------


def transformer_layers(chunks) -> dict[int, torch.nn.Module]:
    """{global 0-based layer: TransformerLayer} of this rank's model chunks."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return {m.layer_number - 1: m for chunk in chunks for m in chunk.modules()
            if isinstance(m, TransformerLayer)}


def _replace_hidden(args, kwargs, fn):
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
    else:
        args = (fn(args[0]), *args[1:])
    return args, kwargs


def _hidden(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _local_valid(padding_mask: torch.Tensor, num_tokens: int, device,
                 process_groups: Optional[ProcessGroupCollection]) -> torch.Tensor:
    """[S_local, B] True = a real token, from the model input's [B, S] padding mask (CP-local)."""
    b = padding_mask.shape[0]
    tp = dist.get_world_size(process_groups.tp) if process_groups is not None else 1
    tp_rank = dist.get_rank(process_groups.tp) if tp > 1 else 0
    ids = torch.where(padding_mask, -1, 0).to(device)
    local = local_token_segment_ids(ids, tp > 1, tp_rank, tp)  # [S_local·B], -1 = padding
    if local.numel() != num_tokens:
        raise ValueError(f"padding mask gives {local.numel()} local tokens, the layer saw {num_tokens}")
    return (local >= 0).reshape(-1, b)


def mean_pool(hidden: torch.Tensor, valid: torch.Tensor, group: Optional[dist.ProcessGroup]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, B, H] hidden, [S, B] valid -> ([B, H] fp32 mean over valid positions, [B] counts),
    summed over the TP×CP group first."""
    weights = valid.to(torch.float32).unsqueeze(-1)
    sums = (hidden.float() * weights).sum(0)
    counts = valid.to(torch.float32).sum(0)
    if group is not None:
        sums = all_reduce_identity_backward(sums, group)
        counts = all_reduce_identity_backward(counts, group)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def info_nce(features: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """[B] −log softmax_j(cos(features_b, anchors_j) / τ)[positives_b]."""
    logits = F.normalize(features.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).t()
    return F.cross_entropy(logits / temperature, positives, reduction="none")


class ShifconObjective:
    """The shift / shift-back hooks and the contrastive term (see the module docstring)."""

    def __init__(self, vectors: LanguageVectors, shift_layer: int, shift_back_layer: int,
                 coeff: float, temperature: float,
                 process_groups: Optional[ProcessGroupCollection] = None):
        if not 0 <= shift_layer < shift_back_layer:
            raise ValueError(f"shifcon needs 0 <= shift_layer < shift_back_layer, got "
                             f"{shift_layer}, {shift_back_layer}")
        for layer in (shift_layer, shift_back_layer):
            if layer not in vectors.layers:
                raise ValueError(f"the language vectors hold layers {list(vectors.layers)}; "
                                 f"shifcon needs layer {layer}: extract them with --layers "
                                 f"{shift_layer},{shift_back_layer}")
        if coeff < 0 or temperature <= 0:
            raise ValueError(f"shifcon needs contrastive_coeff >= 0 and temperature > 0, got "
                             f"{coeff}, {temperature}")
        self.vectors = vectors
        self.anchor_language = vectors.anchor_language
        self.shift_layer, self.shift_back_layer = shift_layer, shift_back_layer
        self.coeff, self.temperature = coeff, temperature
        self.process_groups = process_groups  # megatron's; None: one process alone
        self.sequence_weight: Optional[float] = None  # None: mean over the micro-batch
        self._languages: Optional[Sequence[str]] = None
        self._padding: Optional[torch.Tensor] = None
        self._anchors: Optional[torch.Tensor] = None  # [B_all, H] this micro-batch's negatives
        self._positive_offset = 0
        self._anchor_pass: Optional[dict] = None  # index -> pooled anchors, during the anchor pass
        self._anchor_index: Optional[int] = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.sequences = torch.zeros((), dtype=torch.float64)

    # --- per micro-batch state ---

    def set_batch(self, languages: Sequence[str], padding_mask: torch.Tensor,
                  anchors: Optional[torch.Tensor] = None, positive_offset: int = 0) -> None:
        """languages of the B rows; padding mask [B, S] (CP-local, True = padding); anchors
        [B_all, H]: the pooled anchor representations the rows are contrasted with (row b's
        positive is anchors[positive_offset + b]); None: shift only, no contrastive term."""
        self._languages = list(languages)
        self._padding = padding_mask
        self._anchors = anchors
        self._positive_offset = positive_offset

    def _shift(self, layer: int, hidden: torch.Tensor, sign: float) -> torch.Tensor:
        anchor = self.vectors.at(self.anchor_language, layer)
        deltas = torch.stack([torch.zeros_like(anchor) if lang == self.anchor_language
                              else anchor - self.vectors.at(lang, layer)
                              for lang in self._languages]).to(hidden.device, hidden.dtype)
        return hidden + sign * deltas.unsqueeze(0)  # [S, B, H] + [1, B, H]

    def attach(self, chunks) -> list:
        layers = transformer_layers(chunks)
        handles = []
        if self.shift_layer in layers:
            handles.append(layers[self.shift_layer].register_forward_pre_hook(
                self._shift_hook, with_kwargs=True))
        if self.shift_back_layer in layers:
            handles.append(layers[self.shift_back_layer].register_forward_pre_hook(
                self._shift_back_hook, with_kwargs=True))
        return handles

    def _shift_hook(self, module, args, kwargs):
        if self._languages is None:
            return None
        return _replace_hidden(args, kwargs, lambda h: self._shift(self.shift_layer, h, 1.0))

    def _shift_back_hook(self, module, args, kwargs):
        if self._languages is None:
            return None
        hidden = _hidden(args, kwargs)
        if self._anchor_pass is not None:  # the anchor forward: record, nothing else
            valid = _local_valid(self._padding, hidden.shape[0] * hidden.shape[1], hidden.device,
                                 self.process_groups)
            pooled, _ = mean_pool(hidden.detach(), valid,
                                  routing_reduction_group(self.process_groups))
            self._anchor_pass[self._anchor_index] = pooled
            return None

        def shift_back(h):
            if self._anchors is not None:
                h = self._attach_contrastive(h)
            return self._shift(self.shift_back_layer, h, -1.0)
        return _replace_hidden(args, kwargs, shift_back)

    def _attach_contrastive(self, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        group = routing_reduction_group(self.process_groups)
        valid = _local_valid(self._padding, hidden.shape[0] * hidden.shape[1], hidden.device,
                             self.process_groups)
        pooled, counts = mean_pool(hidden, valid, group)
        b = pooled.shape[0]
        positives = torch.arange(b, device=pooled.device) + self._positive_offset
        losses = info_nce(pooled, self._anchors.to(pooled.device), positives, self.temperature)
        contrasted = torch.tensor([lang != self.anchor_language for lang in self._languages],
                                  device=pooled.device) & (counts > 0)
        loss_sum = torch.where(contrasted, losses, 0.0).sum()
        count = contrasted.sum()
        if group is None or dist.get_rank(group) == 0:  # logged once per TP×CP group
            self.loss_sum = self.loss_sum + loss_sum.detach().double().cpu()
            self.sequences = self.sequences + count.double().cpu()
        if self.sequence_weight is None:
            term = loss_sum * (self.coeff / max(int(count), 1))
        else:
            term = loss_sum * (self.coeff * self.sequence_weight)
        return MoEAuxLossAutoScaler.apply(hidden, term)

    # --- the anchor side ---

    def anchor_features(self, chunks, microbatches, device) -> list[Optional[torch.Tensor]]:
        """Pooled anchor representations entering layer b, per micro-batch, gathered over data
        parallel ([DP·B, H]; None on stages without layer b). Collective."""
        from sara_megatron.sara.online_priors import run_anchor_forward

        pooled: dict[int, torch.Tensor] = {}

        @contextlib.contextmanager
        def observe(index, segments, samples):
            rows = segments.shape[0]
            self.set_batch([self.anchor_language] * rows, segments < 0)
            self._anchor_pass, self._anchor_index = pooled, index
            try:
                yield
            finally:
                self._anchor_pass = self._anchor_index = None
                self._languages = None

        run_anchor_forward(chunks, microbatches, device, observe, self.process_groups)
        group = self.process_groups.dp if self.process_groups is not None else None
        out = []
        for index in range(len(microbatches)):
            if index not in pooled:
                out.append(None)
                continue
            if group is None:
                out.append(pooled[index])
                continue
            parts = [torch.empty_like(pooled[index]) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, pooled[index].contiguous(), group=group)
            out.append(torch.cat(parts))
        return out

    def reduced_mean(self) -> float:
        """Mean contrastive loss over the contrasted sequences since `reset_stats` (collective)."""
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        table = torch.stack([self.loss_sum, self.sequences]).to(device)
        if dist.is_initialized():
            dist.all_reduce(table)
        return float(table[0] / table[1].clamp_min(1))


# --- the offline pass ------------------------------------------------------------------------------


@torch.no_grad()
def extract_language_vectors(chunks, shards, layers: Sequence[int], languages: Sequence[str],
                             micro_batch_size: int, device, progress=None) -> dict:
    """{language: ([len(layers), H] mean hidden state entering each layer, tokens)} over every
    non-padding token of each language's samples. Collective over the world (any layout): data
    parallel ranks take every DP-th sample, pipeline stages their own layers, TP×CP ranks their
    part of each sequence; sums are all-reduced over the world before the division."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sara_megatron.data.batch import pack_tokens
    from sara_megatron.distributed import model_process_groups
    from sara_megatron.models.builder import causal_attention_mask
    from sara_megatron.models.context_parallel import context_parallel_slice

    process_groups = model_process_groups()  # this offline pass is its tool's top

    modules = transformer_layers(chunks)
    position = {layer: i for i, layer in enumerate(layers)}
    hidden_size = chunks[0].config.hidden_size
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
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
            hidden = _hidden(args, kwargs)
            valid = _local_valid(state["padding"], hidden.shape[0] * hidden.shape[1], hidden.device,
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
