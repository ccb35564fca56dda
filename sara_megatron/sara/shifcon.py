"""ShifCon (Zhang et al., 2025) as a baseline objective: shift, contrast, shift back.

    language vectors   v_lang[l]: the mean hidden state entering layer l of the language's
                       samples (an offline pass, `sara/shifcon_extraction.py`; the file:
                       `sara/shifcon_vectors.py`)
    shift              entering layer a:  h ← h + (v_anchor[a] − v_lang[a])   (non-anchor samples)
    shift back         entering layer b:  h ← h − (v_anchor[b] − v_lang[b])
    contrast           on the mean-pooled (non-padding) hidden state of each sample entering each
                       contrast layer (`contrast_layers`: area = a..b-1, the released code's; or
                       b only), an InfoNCE term between a sample and its anchor translation with
                       the other anchors of the micro-batch (over data parallel) as negatives,
                       ℓ(z → a) = −log softmax_j(cos(z_k, a_j)/τ)[k]; symmetric: (ℓ(z → a) +
                       ℓ(a → z)) / 2 among the contrasted samples; averaged over the layers
    L = w_CE·CE + λ_LB·LB + λ_con · mean over non-anchor sequences of the contrastive term

The anchor side comes from a forward of the anchor rows without shift: with gradient, just before
each micro-batch's forward (`anchor_features_with_grad`; the released code trains its English side
too), or without gradient before the step (`anchor_features`). Anchor-language samples are
neither shifted nor contrasted. The shifts and the contrast are forward pre-hooks on the layers,
the loss rides on each contrast layer's input with `MoEAuxLossAutoScaler`, and everything is per
sample through segment ids, so packed rows work as padded ones (docs/objectives.md,
docs/packing.md).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.routing.capture import (
    local_token_segment_ids,
    routing_reduction_group,
    segment_ids_from_padding_mask,
)
from sara_megatron.sara.reduction import all_reduce_identity_backward, gather_rows
from sara_megatron.sara.shifcon_vectors import LanguageVectors


# --- hooks on transformer layers -----------------------------------------------------------------


def transformer_layers(chunks) -> dict[int, torch.nn.Module]:
    """The TransformerLayers of this rank's model chunks by global layer.

    Args:
        chunks: This rank's model chunks.

    Returns:
        {global 0-based layer: TransformerLayer} of the layers this rank holds.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return {m.layer_number - 1: m for chunk in chunks for m in chunk.modules()
            if isinstance(m, TransformerLayer)}


def _replace_hidden(args, kwargs, fn):
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
    else:
        args = (fn(args[0]), *args[1:])
    return args, kwargs


def layer_input(args, kwargs) -> torch.Tensor:
    """The [S, B, H] hidden states a TransformerLayer's forward pre-hook (with kwargs) sees.

    Args:
        args: The positional arguments of the layer's forward.
        kwargs: Its keyword arguments.

    Returns:
        The `hidden_states` argument, by keyword or the first positional one.
    """
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _local_segments(segment_ids: torch.Tensor, num_tokens: int, device,
                    process_groups: Optional[ProcessGroupCollection]) -> torch.Tensor:
    """[S_local·B] segment id of each token a layer on this rank sees (its [S_local, B] order,
    flattened), from the model input's [B, S] ids (CP-local, -1 = padding)."""
    tp = dist.get_world_size(process_groups.tp) if process_groups is not None else 1
    tp_rank = dist.get_rank(process_groups.tp) if tp > 1 else 0
    local = local_token_segment_ids(segment_ids.to(device), tp > 1, tp_rank, tp)
    if local.numel() != num_tokens:
        raise ValueError(f"segment ids give {local.numel()} local tokens, the layer saw {num_tokens}")
    return local


def local_valid_tokens(padding_mask: torch.Tensor, num_tokens: int, device,
                 process_groups: Optional[ProcessGroupCollection]) -> torch.Tensor:
    """Which tokens a layer on this rank sees are real ones.

    Args:
        padding_mask: [B, S] the model input's padding mask (CP-local, True = padding).
        num_tokens: S_local·B, the tokens the layer saw (S_local: S / TP under sequence parallel).
        device: Where the result goes.
        process_groups: Megatron's groups; None is one process alone.

    Returns:
        [S_local, B] bool, True = a real token, in the layer's order.

    Raises:
        ValueError: The mask does not describe `num_tokens` tokens.
    """
    ids = torch.where(padding_mask.to(device), -1, 0)
    return (_local_segments(ids, num_tokens, device, process_groups) >= 0).reshape(
        -1, padding_mask.shape[0])


def segment_mean_pool(hidden: torch.Tensor, segments: torch.Tensor, num_segments: int,
                      group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean hidden state of each segment, summed over the TP×CP group first.

    Args:
        hidden: [S, B, H] hidden states.
        segments: [S·B] segment id of each token in `hidden`'s order, -1 = padding.
        num_segments: n, the number of segments.
        group: The group a sequence's tokens are spread over (identity backward); None: one
            rank.

    Returns:
        ([n, H] fp32 mean of each segment's hidden states, [n] token counts).
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    valid = (segments >= 0).to(torch.float32)
    index = segments.clamp_min(0)
    sums = flat.new_zeros(num_segments, flat.shape[1]).index_add(0, index,
                                                                   flat * valid.unsqueeze(-1))
    counts = valid.new_zeros(num_segments).index_add(0, index, valid)
    if group is not None:
        sums = all_reduce_identity_backward(sums, group)
        counts = all_reduce_identity_backward(counts, group)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def info_nce(features: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """The InfoNCE loss of each feature against its positive among the anchors.

    Args:
        features: [B, H] the samples' representations.
        anchors: [A, H] the candidates (positives and negatives).
        positives: [B] int64 index of each sample's positive in `anchors`.
        temperature: τ > 0.

    Returns:
        [B] fp32 −log softmax_j(cos(features_b, anchors_j) / τ)[positives_b].
    """
    logits = F.normalize(features.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).t()
    return F.cross_entropy(logits / temperature, positives, reduction="none")


def symmetric_info_nce(samples: torch.Tensor, anchors: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """The InfoNCE loss both ways between paired rows, halved (the released ShifCon's).

    Args:
        samples: [m, H] the samples' representations.
        anchors: [m, H] their anchors, row k the positive of sample k.
        temperature: τ > 0.

    Returns:
        [m] fp32 (ℓ(z_k → a) + ℓ(a_k → z)) / 2 with ℓ(x_k → y) = −log softmax_j(cos(x_k, y_j)/τ)[k].
    """
    logits = (F.normalize(samples.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).t()
              / temperature)
    positives = torch.arange(samples.shape[0], device=samples.device)
    return (F.cross_entropy(logits, positives, reduction="none")
            + F.cross_entropy(logits.t(), positives, reduction="none")) / 2


# Where the contrastive term is taken: the mean of the InfoNCE terms over the shifted area's
# layer inputs a..b-1 (the released code's hidden_states[a:b]), or at layer b's input only.
CONTRAST_LAYERS = ("area", "shift_back")


class ShifconObjective:
    """The shift / shift-back hooks and the contrastive term (see the module docstring).

    Args:
        vectors: The language vectors, holding both layers.
        shift_layer: a, the global 0-based layer whose input is shifted.
        shift_back_layer: b > a, whose input is shifted back.
        coeff: λ_con >= 0.
        temperature: τ > 0.
        process_groups: Megatron's groups; None is one process alone.
        symmetric: The InfoNCE both ways (sample → anchors and anchor → samples, halved, among
            the contrasted samples only); False: sample → anchors, every anchor a candidate.
        anchor_gradient: The anchor side is differentiable (its forward runs with gradient,
            `anchor_features_with_grad`); False: the anchors are constants.
        contrast_layers: One of CONTRAST_LAYERS.

    Raises:
        ValueError: Layers out of order or missing from `vectors`, or a bad λ_con, τ or
            `contrast_layers`.
    """

    def __init__(self, vectors: LanguageVectors, shift_layer: int, shift_back_layer: int,
                 coeff: float, temperature: float,
                 process_groups: Optional[ProcessGroupCollection] = None, *,
                 symmetric: bool = True, anchor_gradient: bool = True,
                 contrast_layers: str = "area"):
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
        if contrast_layers not in CONTRAST_LAYERS:
            raise ValueError(f"shifcon contrast_layers must be one of {CONTRAST_LAYERS}, got "
                             f"{contrast_layers!r}")
        self.vectors = vectors
        self.anchor_language = vectors.anchor_language
        self.shift_layer, self.shift_back_layer = shift_layer, shift_back_layer
        self.coeff, self.temperature = coeff, temperature
        self.symmetric, self.anchor_gradient = symmetric, anchor_gradient
        self.contrast_layers = (tuple(range(shift_layer, shift_back_layer))
                                if contrast_layers == "area" else (shift_back_layer,))
        self.process_groups = process_groups  # megatron's; None: one process alone
        self.sequence_weight: Optional[float] = None  # None: mean over the micro-batch
        self._languages: Optional[Sequence[str]] = None
        self._segments: Optional[torch.Tensor] = None  # [B, S] sample of each token, -1 = padding
        self._shift_segments: Optional[torch.Tensor] = None  # [B, S] whose language shifts it
        self._anchors: Optional[dict[int, torch.Tensor]] = None  # layer -> [n_all, H]
        self._positive_offset = 0
        # during a recording forward: layer -> (pooled, token counts) entering the recorded layers
        self._anchor_pass: Optional[dict] = None
        self._anchor_pass_grad = False
        self._record_layers: tuple[int, ...] = self.contrast_layers
        self.reset_stats()

    def reset_stats(self) -> None:
        """Start the logged sums (loss, contrasted sequences) from zero."""
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.sequences = torch.zeros((), dtype=torch.float64)

    # --- per micro-batch state ---

    def set_batch(self, languages: Sequence[str], padding_mask: torch.Tensor,
                  anchors: Optional[dict[int, torch.Tensor]] = None, positive_offset: int = 0,
                  segment_ids: Optional[torch.Tensor] = None) -> None:
        """Take one micro-batch's samples before its forward.

        Args:
            languages: The languages of the micro-batch's n samples.
            padding_mask: [B, S] bool, CP-local, True = padding.
            anchors: {contrast layer: [n_all, H] the pooled anchor representations entering it}
                for the micro-batch's samples over data parallel (sample k's anchor is
                anchors[layer][positive_offset + k]); None: shift only, no contrastive term.
            positive_offset: Where this rank's samples start in the anchors.
            segment_ids: [B, S] int64, CP-local, -1 = padding: packed rows, token -> its sample;
                None: one sample per row (the rows' samples are the n).

        Raises:
            ValueError: The segment ids name more samples than `languages` has.
        """
        self._languages = list(languages)
        if segment_ids is None:
            self._segments = segment_ids_from_padding_mask(padding_mask)
            b, s = padding_mask.shape
            rows = torch.arange(b, device=padding_mask.device).unsqueeze(1).expand(b, s)
            self._shift_segments = rows  # a row's padding shifts with its sample, as it always has
        else:
            self._segments = self._shift_segments = segment_ids
        if self._segments.numel() and int(self._segments.max()) >= len(self._languages):
            raise ValueError(f"segment ids name more samples than the {len(self._languages)} "
                             "languages given")
        self._anchors = anchors
        self._positive_offset = positive_offset

    def contrasted_in(self, microbatches) -> int:
        """The number of samples the contrastive term averages over: those not in the anchor
        language.

        Args:
            microbatches: Micro-batches with `languages`.
        """
        return sum(lang != self.anchor_language for mb in microbatches for lang in mb.languages)

    def _shift(self, layer: int, hidden: torch.Tensor, sign: float) -> torch.Tensor:
        """Each token shifted by its sample's language vectors (padding of packed rows: not)."""
        anchor = self.vectors.at(self.anchor_language, layer)
        deltas = torch.stack([torch.zeros_like(anchor) if lang == self.anchor_language
                              else anchor - self.vectors.at(lang, layer)
                              for lang in self._languages] + [torch.zeros_like(anchor)])
        ids = _local_segments(self._shift_segments, hidden.shape[0] * hidden.shape[1],
                              hidden.device, self.process_groups)
        ids = torch.where(ids < 0, len(self._languages), ids)  # -1 -> the zero row
        per_token = deltas.to(hidden.device, hidden.dtype)[ids].reshape(hidden.shape)
        return hidden + sign * per_token  # [S, B, H]

    def attach(self, chunks) -> list:
        """Register the hooks (shift, contrast, shift back) on the layers `chunks` hold.

        Args:
            chunks: This rank's bare model chunks.

        Returns:
            The hook handles.
        """
        layers = transformer_layers(chunks)
        wanted = sorted({self.shift_layer, self.shift_back_layer, *self.contrast_layers})
        return [layers[layer].register_forward_pre_hook(self._layer_hook(layer),
                                                        with_kwargs=True)
                for layer in wanted if layer in layers]

    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._languages is None:
                return None
            if self._anchor_pass is not None:  # a recording forward: record, no shift
                if layer in self._record_layers:
                    hidden = layer_input(args, kwargs)
                    self._anchor_pass[layer] = self._pool(
                        hidden if self._anchor_pass_grad else hidden.detach())
                return None

            def transform(h):
                if layer == self.shift_layer:
                    h = self._shift(layer, h, 1.0)
                if layer in self.contrast_layers and self._anchors is not None:
                    h = self._attach_contrastive(layer, h)
                if layer == self.shift_back_layer:
                    h = self._shift(layer, h, -1.0)
                return h
            return _replace_hidden(args, kwargs, transform)
        return hook

    def _pool(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, H] mean hidden state of each sample over its own tokens, [n] token counts)."""
        ids = _local_segments(self._segments, hidden.shape[0] * hidden.shape[1], hidden.device,
                              self.process_groups)
        return segment_mean_pool(hidden, ids, len(self._languages),
                                 routing_reduction_group(self.process_groups))

    def _losses(self, layer: int, pooled: torch.Tensor, contrasted: torch.Tensor
                ) -> torch.Tensor:
        """[n] the InfoNCE term of each of this rank's samples at `layer` (0 where not
        contrasted)."""
        anchors = self._anchors[layer].to(pooled.device)
        n = pooled.shape[0]
        if not self.symmetric:
            positives = torch.arange(n, device=pooled.device) + self._positive_offset
            return torch.where(contrasted, info_nce(pooled, anchors, positives,
                                                    self.temperature), 0.0)
        dp = self.process_groups.dp if self.process_groups is not None else None
        samples, offset = gather_rows(pooled, dp)
        mask, _ = gather_rows(contrasted.float().unsqueeze(1), dp)
        index = mask.squeeze(1).nonzero().squeeze(1)  # the contrasted samples over DP
        losses = symmetric_info_nce(samples[index], anchors[index], self.temperature)
        local = (index >= offset) & (index < offset + n)
        return pooled.new_zeros(n).index_put((index[local] - offset,), losses[local])

    def _attach_contrastive(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        group = routing_reduction_group(self.process_groups)
        pooled, counts = self._pool(hidden)
        contrasted = torch.tensor([lang != self.anchor_language for lang in self._languages],
                                  device=pooled.device) & (counts > 0)
        # the area's layers count equally: their mean is the term
        loss_sum = self._losses(layer, pooled, contrasted).sum() / len(self.contrast_layers)
        count = contrasted.sum()
        if group is None or dist.get_rank(group) == 0:  # logged once per TP×CP group
            self.loss_sum = self.loss_sum + loss_sum.detach().double().cpu()
            if layer == self.contrast_layers[0]:
                self.sequences = self.sequences + count.double().cpu()
        if self.sequence_weight is None:
            term = loss_sum * (self.coeff / max(int(count), 1))
        else:
            term = loss_sum * (self.coeff * self.sequence_weight)
        return MoEAuxLossAutoScaler.apply(hidden, term)

    # --- the anchor side ---

    @contextlib.contextmanager
    def recording(self, samples: int, segments: torch.Tensor, pooled: dict,
                  layers: Optional[Sequence[int]] = None, grad: bool = False):
        """While active, a forward shifts nothing and the hooks record each sample's mean hidden
        state entering `layers` into `pooled`.

        Args:
            samples: The forward's samples, numbered by `segments`.
            segments: [R, S_local] the forward's segment ids (CP-local, -1 = padding).
            pooled: Filled with {layer: ([samples, H] fp32 means, [samples] token counts)}.
            layers: The layers recorded; None: the contrast layers.
            grad: Keep the graph (the trained anchor side); False: detached.
        """
        self.set_batch([self.anchor_language] * samples, segments < 0, segment_ids=segments)
        self._anchor_pass, self._anchor_pass_grad = pooled, grad
        self._record_layers = self.contrast_layers if layers is None else tuple(layers)
        try:
            yield
        finally:
            self._anchor_pass, self._anchor_pass_grad = None, False
            self._record_layers = self.contrast_layers
            self._languages = None

    def anchor_features(self, chunks, microbatches, device
                        ) -> list[Optional[tuple[dict[int, torch.Tensor], int]]]:
        """The anchor forward of a step, without gradient and without shift (the anchors as
        constants, `anchor_gradient` False). Collective.

        Args:
            chunks: This rank's model chunks.
            microbatches: The step's micro-batches, with anchor rows.
            device: Where the model runs.

        Returns:
            Per micro-batch: ({contrast layer: [n_all, H] the pooled anchor representations
            entering it of its samples, gathered over data parallel in rank order (packed
            micro-batches hold varying numbers of samples per rank)}, the offset of this rank's
            samples in them); None on stages without the contrast layers.
        """
        from sara_megatron.sara.online_priors import run_anchor_forward

        pooled: dict[int, dict] = {}

        def observe(index, segments, samples):
            return self.recording(samples, segments, pooled.setdefault(index, {}))

        # Nothing past the last contrast layer's input is read: the forward stops there.
        run_anchor_forward(chunks, microbatches, device, observe, self.process_groups,
                           stop_after=self.contrast_layers[-1])
        return [self._gathered(pooled.get(index)) for index in range(len(microbatches))]

    def anchor_features_with_grad(self, chunk, view, device
                                  ) -> Optional[tuple[dict[int, torch.Tensor], int]]:
        """One micro-batch's anchor forward with gradient, without shift, in eval mode (no
        router jitter and no load-balancing loss on the anchors): the anchor side of the
        contrastive term is trained through it. One model chunk (no pipeline parallelism).
        Collective over the model-parallel and data-parallel ranks.

        Args:
            chunk: This rank's only model chunk (`GPTModel`, wrapped or not).
            view: The micro-batch's `online_priors.AnchorRowsView` (rows padded to the step's
                count).
            device: Where the model runs.

        Returns:
            As one entry of `anchor_features`, the anchors differentiable (the gather over data
            parallel sends their gradients back to the ranks that computed them).
        """
        from sara_megatron.routing.forward_runner import (
            ForwardRows,
            ForwardRunner,
            stop_after_layer,
        )

        runner = ForwardRunner([chunk], device, self.process_groups)
        rows = ForwardRows(view.tokens, view.padding_mask, view.segment_ids, view.position_ids,
                           packed=view.segment_ids is not None, samples=view.samples)
        tokens, labels, inputs = runner.inputs(rows)
        pooled: dict = {}
        training = chunk.training
        chunk.eval()
        try:
            with stop_after_layer([chunk], self.contrast_layers[-1]), \
                    self.recording(view.samples, inputs.segment_ids, pooled, grad=True), \
                    inputs.rope(chunk):
                chunk(tokens, inputs.positions, inputs.attention_mask, labels=labels)
        finally:
            chunk.train(training)
        return self._gathered(pooled)

    def _gathered(self, pooled: Optional[dict]) -> Optional[tuple[dict[int, torch.Tensor], int]]:
        """One micro-batch's pooled anchors per layer, gathered over data parallel."""
        if not pooled:
            return None
        group = self.process_groups.dp if self.process_groups is not None else None
        gathered, offset = {}, 0
        for layer in sorted(pooled):
            gathered[layer], offset = gather_rows(pooled[layer][0], group)
        return gathered, offset

    def reduced_mean(self) -> float:
        """The mean contrastive loss over the contrasted sequences since `reset_stats`
        (collective over the world)."""
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        table = torch.stack([self.loss_sum, self.sequences]).to(device)
        if dist.is_initialized():
            dist.all_reduce(table)
        return float(table[0] / table[1].clamp_min(1))
