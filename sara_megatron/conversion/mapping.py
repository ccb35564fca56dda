"""Hugging Face hub tensors ⇄ Megatron-Core checkpoint tensors, for Qwen3-MoE and PhiMoE.

The one place the weight layout correspondence lives; import, export, and the tests read it.
A Megatron tensor is named by its checkpoint key plus its indices on the key's prepended axes
(`(layer,)`, `(layer, expert)`, global), and is a stack, along its first axis, of row ranges of
hub tensors (`Piece`s): fused QKV per query group, expert fc1 = [gate; up], vocabulary-sized
tensors padded with zero rows. The full layout: docs/conversion.md.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from sara_megatron.conversion.errors import ConversionError
from sara_megatron.models.architecture import SUPPORTED_FAMILIES, MoEArchitecture

# Megatron-Core checkpoint keys (global; layer and expert indices live on prepended axes).
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_WEIGHT = "output_layer.weight"
OUTPUT_BIAS = "output_layer.bias"
FINAL_NORM = "decoder.final_layernorm."
_LAYER = "decoder.layers."
INPUT_NORM = _LAYER + "self_attention.linear_qkv.layer_norm_"  # + weight | bias
QKV = _LAYER + "self_attention.linear_qkv."
PROJ = _LAYER + "self_attention.linear_proj."
Q_NORM = _LAYER + "self_attention.q_layernorm.weight"
K_NORM = _LAYER + "self_attention.k_layernorm.weight"
PRE_MLP_NORM = _LAYER + "mlp.linear_fc1.layer_norm_"  # + weight | bias
ROUTER = _LAYER + "mlp.router.weight"
EXPERT_FC1 = _LAYER + "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = _LAYER + "mlp.experts.experts.linear_fc2.weight"


@dataclasses.dataclass(frozen=True)
class HubNames:
    """Hub key layout of one family (`save_pretrained` / the released checkpoints)."""

    embed: str
    lm_head: str
    final_norm: str
    layer: str  # format with i=
    input_norm: str
    post_attention_norm: str
    q: str
    k: str
    v: str
    o: str
    q_norm: str | None
    k_norm: str | None
    router: str
    expert: str  # format with e=
    gate: str
    up: str
    down: str


HUB_NAMES = {
    "qwen3_moe": HubNames(
        embed="model.embed_tokens.", lm_head="lm_head.", final_norm="model.norm.",
        layer="model.layers.{i}.", input_norm="input_layernorm.",
        post_attention_norm="post_attention_layernorm.",
        q="self_attn.q_proj.", k="self_attn.k_proj.", v="self_attn.v_proj.",
        o="self_attn.o_proj.", q_norm="self_attn.q_norm.", k_norm="self_attn.k_norm.",
        router="mlp.gate.", expert="mlp.experts.{e}.",
        gate="gate_proj.", up="up_proj.", down="down_proj.",
    ),
    "phimoe": HubNames(
        embed="model.embed_tokens.", lm_head="lm_head.", final_norm="model.norm.",
        layer="model.layers.{i}.", input_norm="input_layernorm.",
        post_attention_norm="post_attention_layernorm.",
        q="self_attn.q_proj.", k="self_attn.k_proj.", v="self_attn.v_proj.",
        o="self_attn.o_proj.", q_norm=None, k_norm=None,
        router="block_sparse_moe.gate.", expert="block_sparse_moe.experts.{e}.",
        gate="w1.", up="w3.", down="w2.",
    ),
}
assert set(HUB_NAMES) == set(SUPPORTED_FAMILIES)

# Hub tensors that are not weights (non-persistent buffers some older checkpoints carry).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of hub tensor `hf`, or `stop - start` padding rows when `hf` is None."""

    hf: str | None
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """The number of rows the piece spans (`stop - start`)."""
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One Megatron tensor (checkpoint key at `index`) as a row stack of hub tensor pieces."""

    key: str
    index: tuple[int, ...]
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    def hf_names(self) -> list[str]:
        """The hub tensors this Megatron tensor is built from, in first-piece order.

        Returns:
            The hub tensor names (padding pieces left out), each once.
        """
        seen: dict[str, None] = {}
        for p in self.pieces:
            if p.hf is not None:
                seen.setdefault(p.hf)
        return list(seen)

    def read_region(self, region: Sequence[slice], read, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with the Megatron tensor's `region` (one slice per axis) from hub tensors.

        Each piece lands in its rows of `out` through `read(name, (row_start, row_stop),
        rest_slices, out=rows_of_out)`; only the rows inside the region are asked for. Padding
        rows are zeros.

        Args:
            region: One slice per axis of the Megatron tensor (`self.shape`, stacked axes excluded).
            read: The reader: `read(name, (row_start, row_stop), rest_slices, out=tensor)` fills
                `tensor` with those rows of hub tensor `name` (e.g. `SafetensorsCheckpoint.read`).
            out: The destination, shaped like `region`.

        Returns:
            `out`, filled.

        Raises:
            ConversionError: `region` has another number of axes than the tensor, or `out` another
                shape than the region.
        """
        if len(region) != len(self.shape):
            raise ConversionError(f"{self.key}{list(self.index)}: region {region} vs {self.shape}")
        r0, r1, _ = region[0].indices(self.shape[0])
        rest = tuple(region[1:])
        rest_shape = tuple(len(range(*s.indices(n))) for s, n in zip(rest, self.shape[1:]))
        if tuple(out.shape) != (r1 - r0,) + rest_shape:
            raise ConversionError(f"{self.key}{list(self.index)}: destination shape "
                                  f"{tuple(out.shape)} for region {region}")
        offset, filled = 0, 0
        for p in self.pieces:
            lo, hi = max(offset, r0), min(offset + p.rows, r1)
            if lo < hi:
                dst = out[filled: filled + hi - lo]
                if p.hf is None:
                    dst.zero_()
                else:
                    read(p.hf, (p.start + lo - offset, p.start + hi - offset), rest, out=dst)
                filled += hi - lo
            offset += p.rows
        return out

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hub tensors inside a whole Megatron tensor (padding rows dropped).

        Args:
            tensor: The whole Megatron tensor, of shape `self.shape`.

        Returns:
            Hub tensor name → its tensor (views of `tensor`, or their concatenation).

        Raises:
            ConversionError: `tensor` has another shape than `self.shape`.
        """
        if tuple(tensor.shape) != self.shape:
            raise ConversionError(
                f"{self.key}{list(self.index)}: got shape {tuple(tensor.shape)}, "
                f"expected {self.shape}"
            )
        rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
        offset = 0
        for p in self.pieces:
            if p.hf is not None:
                rows.setdefault(p.hf, []).append((p.start, tensor[offset: offset + p.rows]))
            offset += p.rows
        out = {}
        for name, parts in rows.items():
            parts.sort(key=lambda x: x[0])
            out[name] = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
        return out


@dataclasses.dataclass
class ModelMapping:
    """All tensors of one model: Megatron mappings, and the hub tensors with their shapes."""

    arch: MoEArchitecture
    padded_vocab_size: int
    mappings: list[TensorMapping]
    hf_shapes: dict[str, tuple[int, ...]]

    def __post_init__(self):
        self._by_key = {(m.key, m.index): m for m in self.mappings}
        if len(self._by_key) != len(self.mappings):
            raise AssertionError("duplicate Megatron tensor in mapping")

    def get(self, key: str, index: tuple[int, ...]) -> TensorMapping:
        """The mapping of the Megatron tensor `key` at stacked index `index`.

        Args:
            key: The checkpoint key.
            index: The global layer / expert index (the prepended axes).

        Raises:
            ConversionError: The mapping has no such tensor (a megatron-core layout change).
        """
        try:
            return self._by_key[(key, tuple(index))]
        except KeyError:
            raise ConversionError(
                f"the Megatron model has tensor {key} at index {list(index)}, which the "
                f"{self.arch.family} mapping does not know (megatron-core layout change?)"
            ) from None

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """The global shape of every checkpoint key: prepended axes (layers, experts) + tensor.

        Returns:
            Checkpoint key → global shape.
        """
        shapes: dict[str, tuple[int, ...]] = {}
        for m in self.mappings:
            stack = tuple(i + 1 for i in m.index)
            prev = shapes.get(m.key)
            if prev is not None:
                stack = tuple(max(a, b) for a, b in zip(prev[: len(stack)], stack))
            shapes[m.key] = stack + m.shape
        return shapes

    def check_hf_tensors(self, shapes: Mapping[str, Sequence[int]], where: str) -> list[str]:
        """Raise naming missing / unexpected / wrongly shaped hub tensors.

        Args:
            shapes: Hub tensor name → shape, as found in the HF checkpoint.
            where: How the checkpoint is named in the error.

        Returns:
            The names that are present but deliberately not read (non-persistent buffers, a tied
            checkpoint's lm_head), logged by the caller.

        Raises:
            ConversionError: A hub tensor is missing, unexpected, or of another shape than the
                config implies.
        """
        expected = set(self.hf_shapes)
        present = set(shapes)
        # A tied checkpoint may still carry lm_head.weight (transformers ties it on load).
        tied_head = HUB_NAMES[self.arch.family].lm_head + "weight"
        ignored = sorted(
            n for n in present - expected
            if n.endswith(_IGNORABLE_SUFFIXES)
            or (self.arch.tie_word_embeddings and n == tied_head)
        )
        missing = sorted(expected - present)
        unexpected = sorted(present - expected - set(ignored))
        problems = []
        if missing:
            problems.append(f"missing tensors: {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_list(unexpected)}")
        for name in sorted(expected & present):
            got, want = tuple(shapes[name]), self.hf_shapes[name]
            if got != want:
                problems.append(
                    f"shape mismatch for {name}: checkpoint has {got}, the config implies {want}"
                )
        if problems:
            raise ConversionError(
                f"{where} does not match its {self.arch.family} config: " + "; ".join(problems)
            )
        return ignored


def _list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def build_mapping(arch: MoEArchitecture, padded_vocab_size: int | None = None) -> ModelMapping:
    """The mapping of every tensor of `arch`.

    Args:
        arch: The model architecture (a supported family).
        padded_vocab_size: The vocabulary size with padding rows, e.g. read from a checkpoint;
            None uses `arch.padded_vocab_size()`.

    Raises:
        ConversionError: The family has no conversion, the padded vocabulary is smaller than the
            vocabulary, or the attention heads do not divide into the KV groups.
    """
    if arch.family not in HUB_NAMES:
        raise ConversionError(
            f"no conversion for family {arch.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    hub = HUB_NAMES[arch.family]
    vocab, vp = arch.vocab_size, padded_vocab_size or arch.padded_vocab_size()
    if vp < vocab:
        raise ConversionError(f"padded vocabulary {vp} is smaller than vocab_size {vocab}")
    h, d = arch.hidden_size, arch.kv_channels
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    if heads % groups:
        raise ConversionError(f"num_attention_heads {heads} not divisible by KV groups {groups}")
    per_group = heads // groups
    ffn, experts = arch.moe_ffn_hidden_size, arch.num_experts
    norm_kinds = ("weight", "bias") if arch.norm == "LayerNorm" else ("weight",)

    mappings: list[TensorMapping] = []
    hf_shapes: dict[str, tuple[int, ...]] = {}

    def whole(key, index, hf, shape):
        hf_shapes[hf] = shape
        mappings.append(TensorMapping(key, index, shape, (Piece(hf, 0, shape[0]),)))

    def vocab_padded(key, hf, trailing):
        hf_shapes[hf] = (vocab,) + trailing
        pieces = (Piece(hf, 0, vocab),) + ((Piece(None, 0, vp - vocab),) if vp > vocab else ())
        mappings.append(TensorMapping(key, (), (vp,) + trailing, pieces))

    def qkv(key, index, prefix, kind):
        trailing = (h,) if kind == "weight" else ()
        q, k, v = (prefix + getattr(hub, p) + kind for p in "qkv")
        hf_shapes[q] = (heads * d,) + trailing
        hf_shapes[k] = hf_shapes[v] = (groups * d,) + trailing
        pieces = []
        for g in range(groups):
            pieces += [
                Piece(q, g * per_group * d, (g + 1) * per_group * d),
                Piece(k, g * d, (g + 1) * d),
                Piece(v, g * d, (g + 1) * d),
            ]
        shape = ((heads + 2 * groups) * d,) + trailing
        mappings.append(TensorMapping(key, index, shape, tuple(pieces)))

    vocab_padded(EMBEDDING, hub.embed + "weight", (h,))
    for i in range(arch.num_layers):
        layer = hub.layer.format(i=i)
        at = (i,)
        for kind in norm_kinds:
            whole(INPUT_NORM + kind, at, layer + hub.input_norm + kind, (h,))
        qkv(QKV + "weight", at, layer, "weight")
        if arch.add_qkv_bias:
            qkv(QKV + "bias", at, layer, "bias")
        whole(PROJ + "weight", at, layer + hub.o + "weight", (h, heads * d))
        if arch.add_attn_output_bias:
            whole(PROJ + "bias", at, layer + hub.o + "bias", (h,))
        if arch.qk_layernorm:
            whole(Q_NORM, at, layer + hub.q_norm + "weight", (d,))
            whole(K_NORM, at, layer + hub.k_norm + "weight", (d,))
        for kind in norm_kinds:
            whole(PRE_MLP_NORM + kind, at, layer + hub.post_attention_norm + kind, (h,))
        whole(ROUTER, at, layer + hub.router + "weight", (experts, h))
        for e in range(experts):
            expert = layer + hub.expert.format(e=e)
            gate, up = expert + hub.gate + "weight", expert + hub.up + "weight"
            hf_shapes[gate] = hf_shapes[up] = (ffn, h)
            mappings.append(TensorMapping(
                EXPERT_FC1, (i, e), (2 * ffn, h), (Piece(gate, 0, ffn), Piece(up, 0, ffn))
            ))
            whole(EXPERT_FC2, (i, e), expert + hub.down + "weight", (h, ffn))
    for kind in norm_kinds:
        whole(FINAL_NORM + kind, (), hub.final_norm + kind, (h,))
    if not arch.tie_word_embeddings:
        vocab_padded(OUTPUT_WEIGHT, hub.lm_head + "weight", (h,))
    if arch.add_lm_head_bias:
        vocab_padded(OUTPUT_BIAS, hub.lm_head + "bias", ())
    return ModelMapping(arch, vp, mappings, hf_shapes)

