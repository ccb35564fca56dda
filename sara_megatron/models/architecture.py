"""Model architectures: the two supported MoE families, their presets, and HF config parsing.

`MoEArchitecture` is the one description of a model that the builder, the converter and the
training code read. It is filled either from a named preset or from a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_FAMILIES = ("qwen3_moe", "phimoe")
# HF `architectures[0]` / `model_type` values we accept for each family.
_HF_MODEL_TYPES = {"qwen3_moe": "qwen3_moe", "phimoe": "phimoe"}
_HF_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "PhiMoEForCausalLM": "phimoe"}


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
    """Phi-3 "longrope": per-frequency rescale factors, short below / long above the switch."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    short_mscale: float
    long_mscale: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class MoEArchitecture:
    family: str  # one of SUPPORTED_FAMILIES
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dim; Qwen3-30B-A3B: 128, not hidden / heads
    vocab_size: int  # the HF vocabulary size; Megatron pads it (`padded_vocab_size`)
    num_experts: int
    moe_router_topk: int
    moe_ffn_hidden_size: int
    norm: str  # "RMSNorm" | "LayerNorm"
    norm_epsilon: float
    qk_layernorm: bool
    rotary_base: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    add_attn_output_bias: bool = False  # Phi: o_proj bias with no bias on router or experts
    add_lm_head_bias: bool = False
    # Qwen3 `norm_topk_prob=True`: softmax over all experts, top-k, renormalise — Megatron's
    # `moe_router_pre_softmax=False`. False would mean softmax, top-k, no renormalisation.
    norm_topk_prob: bool = True
    router: str = "topk"  # "topk" | "sparsemixer"
    router_jitter_noise: float = 0.0
    input_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.0
    longrope: LongRopeScaling | None = None
    hf_config: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    def padded_vocab_size(self, tp: int = 1, divisible_by: int = 128) -> int:
        """Vocabulary padded for Megatron's vocab-parallel embedding.

        Padded to a multiple of `divisible_by`, and further to `divisible_by * tp` only when TP
        does not divide that, so the padded size (and the checkpoint shapes) stay the same for
        every TP size that divides it (Qwen3 151936 and Phi 32128 serve TP 1/2/4/8 alike).
        """
        padded = math.ceil(self.vocab_size / divisible_by) * divisible_by
        if padded % tp:
            step = divisible_by * tp
            padded = math.ceil(self.vocab_size / step) * step
        return padded

    def validate_parallel(self, tp: int = 1, ep: int = 1, pp: int = 1, vpp: int | None = None):
        """Raise before anything is allocated when a parallel size does not divide the model."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(
                f"TP={tp} must divide num_attention_heads={self.num_attention_heads}"
            )
        if self.num_query_groups % tp:
            problems.append(f"TP={tp} must divide num_query_groups={self.num_query_groups}")
        if self.num_experts % ep:
            problems.append(f"EP={ep} must divide num_experts={self.num_experts}")
        stages = pp * (vpp or 1)
        if self.num_layers % stages:
            problems.append(
                f"PP={pp}" + (f"×VPP={vpp}" if vpp else "")
                + f" must divide num_layers={self.num_layers}"
            )
        if problems:
            raise ValueError(
                f"parallel layout does not fit {self.family} model: " + "; ".join(problems)
            )


# --- Presets -----------------------------------------------------------------------------------

# Qwen3-30B-A3B (config.json of the released checkpoint).
QWEN3_30B_A3B = MoEArchitecture(
    family="qwen3_moe",
    num_layers=48,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=4,
    kv_channels=128,
    vocab_size=151936,
    num_experts=128,
    moe_router_topk=8,
    moe_ffn_hidden_size=768,
    norm="RMSNorm",
    norm_epsilon=1e-6,
    qk_layernorm=True,
    rotary_base=1_000_000.0,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
)

QWEN3_MOE_TINY = dataclasses.replace(
    QWEN3_30B_A3B,
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,  # != hidden / heads, like the real model
    vocab_size=256,
    num_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    max_position_embeddings=512,
)


def _phi35_moe() -> MoEArchitecture:
    from sara_megatron.models.phimoe_longrope import PHI35_MOE_LONGROPE

    return MoEArchitecture(
        family="phimoe",
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=32064,
        num_experts=16,
        moe_router_topk=2,
        moe_ffn_hidden_size=6400,
        norm="LayerNorm",
        norm_epsilon=1e-5,
        qk_layernorm=False,
        rotary_base=10000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        add_qkv_bias=True,
        add_attn_output_bias=True,
        add_lm_head_bias=True,
        norm_topk_prob=False,
        router="sparsemixer",
        router_jitter_noise=0.01,
        input_jitter_noise=0.01,
        router_aux_loss_coef=0.0,
        longrope=PHI35_MOE_LONGROPE,
    )


def _phi35_moe_tiny() -> MoEArchitecture:
    full = _phi35_moe()
    head_dim = 16
    half = head_dim // 2
    # Keep the real factors' shape of variation (first `half` entries) so the tiny model exercises
    # non-trivial longrope; the switch at 64 positions lets tests cross it cheaply.
    rope = LongRopeScaling(
        short_factor=full.longrope.short_factor[:half],
        long_factor=full.longrope.long_factor[:half],
        short_mscale=full.longrope.short_mscale,
        long_mscale=full.longrope.long_mscale,
        original_max_position_embeddings=64,
    )
    return dataclasses.replace(
        full,
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=head_dim,
        vocab_size=250,  # not a multiple of 128: exercises padding like Phi's 32064
        num_experts=4,
        moe_ffn_hidden_size=32,
        max_position_embeddings=2048,
        longrope=rope,
    )


_PRESETS = {
    "qwen3_moe": lambda: QWEN3_30B_A3B,
    "qwen3_moe_tiny": lambda: QWEN3_MOE_TINY,
    "phi35_moe": _phi35_moe,
    "phi35_moe_tiny": _phi35_moe_tiny,
}
PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str) -> MoEArchitecture:
    if name not in _PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; supported presets: {', '.join(PRESET_NAMES)} "
            f"(or pass an HF config.json of a {' / '.join(SUPPORTED_FAMILIES)} model)"
        )
    return _PRESETS[name]()


# --- Hugging Face config.json -------------------------------------------------------------------


def _family_of(cfg: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    for arch in cfg.get("architectures") or ():
        if arch in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[arch]
    raise ValueError(
        f"unsupported HF architecture (model_type={model_type!r}, "
        f"architectures={cfg.get('architectures')}); supported: "
        + ", ".join(f"{a} (model_type {t!r})" for a, t in _HF_ARCHITECTURES.items())
    )


def _require(cfg: dict, *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"HF config is missing required fields: {', '.join(missing)}")
    return [cfg[k] for k in keys]


def from_hf_config(config: dict | str | os.PathLike) -> MoEArchitecture:
    """Architecture from an HF `config.json` (a path to the file or its folder, or a dict)."""
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    cfg = dict(config)
    family = _family_of(cfg)
    layers, hidden, heads, vocab = _require(
        cfg, "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"
    )
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    common = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        vocab_size=vocab,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
        hf_config=cfg,
    )
    rope_params = cfg.get("rope_parameters") or {}  # transformers 5.x nests rope settings here
    # Absent θ: transformers' per-family default (Qwen3MoeConfig 1e4, PhimoeConfig 1e6).
    default_theta = 1_000_000.0 if family == "phimoe" else 10000.0
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", default_theta))
    if family == "qwen3_moe":
        # The hub's config.json says num_experts; transformers 5.x writes num_local_experts.
        if "num_experts" not in cfg and "num_local_experts" in cfg:
            cfg["num_experts"] = cfg["num_local_experts"]
        (n_experts, topk, moe_ffn) = _require(
            cfg, "num_experts", "num_experts_per_tok", "moe_intermediate_size"
        )
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ValueError(
                "Qwen3-MoE configs with dense layers (mlp_only_layers / decoder_sparse_step != 1) "
                "are not supported: every layer must be an MoE layer"
            )
        if cfg.get("attention_bias"):
            raise ValueError("Qwen3-MoE with attention_bias=True is not supported")
        return MoEArchitecture(
            family=family,
            num_experts=n_experts,
            moe_router_topk=topk,
            moe_ffn_hidden_size=moe_ffn,
            norm="RMSNorm",
            norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
            qk_layernorm=True,
            rotary_base=float(rope_theta),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            **common,
        )
    # phimoe
    (n_experts, topk, ffn) = _require(
        cfg, "num_local_experts", "num_experts_per_tok", "intermediate_size"
    )
    if topk != 2:
        raise ValueError(f"PhiMoE sparsemixer routing is top-2 only; config has top-{topk}")
    # transformers 4.x: `rope_scaling` (null for plain RoPE); 5.x: `rope_parameters` always, with
    # rope_type "default" for plain RoPE.
    scaling = cfg.get("rope_scaling") or (
        rope_params
        if rope_params.get("rope_type", rope_params.get("type", "default")) != "default"
        else None
    )
    longrope = None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in ("longrope", "su"):  # "su": the older name of longrope
            raise ValueError(f"PhiMoE rope scaling {rope_type!r} is not supported (longrope only)")
        longrope = LongRopeScaling(
            short_factor=tuple(float(x) for x in scaling["short_factor"]),
            long_factor=tuple(float(x) for x in scaling["long_factor"]),
            short_mscale=float(scaling.get("short_mscale", 1.0)),
            long_mscale=float(scaling.get("long_mscale", 1.0)),
            # transformers gives the top-level field priority over the one in the rope dict.
            original_max_position_embeddings=int(
                cfg.get("original_max_position_embeddings")
                or scaling.get("original_max_position_embeddings")
                or common["max_position_embeddings"]
            ),
        )
    attention_bias = bool(cfg.get("attention_bias", False))
    return MoEArchitecture(
        family=family,
        num_experts=n_experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=ffn,
        norm="LayerNorm",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-5),  # PhiMoE names its LayerNorm eps so
        qk_layernorm=False,
        rotary_base=float(rope_theta),
        add_qkv_bias=attention_bias,
        add_attn_output_bias=attention_bias,
        add_lm_head_bias=bool(cfg.get("lm_head_bias", False)),
        norm_topk_prob=False,
        router="sparsemixer",
        router_jitter_noise=float(cfg.get("router_jitter_noise", 0.0)),
        input_jitter_noise=float(cfg.get("input_jitter_noise", 0.0)),
        longrope=longrope,
        **common,
    )


def resolve_architecture(preset_or_config: str | os.PathLike | dict) -> MoEArchitecture:
    """A preset name, or a path to an HF config.json / checkpoint folder, or a config dict."""
    if isinstance(preset_or_config, dict):
        return from_hf_config(preset_or_config)
    text = os.fspath(preset_or_config)
    if text in _PRESETS:
        return get_preset(text)
    if os.path.exists(text):
        return from_hf_config(text)
    return get_preset(text)  # raises with the list of presets
