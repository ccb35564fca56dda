"""Model architectures: the two supported MoE families, their presets, and HF config parsing.

`MoEArchitecture` is the one description of a model that the builder, the converter and the
training code read. It is filled either from a named preset or from a Hugging Face `config.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

from sara_megatron.io import read_json_file
from sara_megatron.models.phimoe_longrope import PHI35_MOE_LONGROPE, LongRopeScaling
from sara_megatron.tool_errors import InputError

SUPPORTED_FAMILIES = ("qwen3_moe", "phimoe")
# HF `architectures[0]` / `model_type` values we accept for each family.
_HF_MODEL_TYPES = {"qwen3_moe": "qwen3_moe", "phimoe": "phimoe"}
_HF_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "PhiMoEForCausalLM": "phimoe"}


@dataclasses.dataclass(frozen=True)
class MoEArchitecture:
    """One MoE model's shape and variants, as the builder, the converter and training read it
    (field meanings in the comments; HF names map as `from_hf_config` reads them)."""

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

        Args:
            tp: the tensor-parallel size.
            divisible_by: megatron's `make_vocab_size_divisible_by`.

        Returns:
            The padded vocabulary size (>= `vocab_size`).
        """
        padded = math.ceil(self.vocab_size / divisible_by) * divisible_by
        if padded % tp:
            step = divisible_by * tp
            padded = math.ceil(self.vocab_size / step) * step
        return padded

    def validate_parallel(self, tp: int = 1, ep: int = 1, pp: int = 1, vpp: int | None = None):
        """Raise before anything is allocated when a parallel size does not divide the model.

        Args:
            tp: tensor-parallel size (must divide the attention heads and query groups).
            ep: expert-parallel size (must divide the experts).
            pp: pipeline-parallel size.
            vpp: virtual pipeline stages per rank, or None; PP × VPP must divide the layers.

        Raises:
            InputError: a size below 1, or one that does not divide the model (all named).
        """
        _require_positive_sizes(TP=tp, EP=ep, PP=pp, VPP=vpp)
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
            raise InputError(
                f"parallel layout does not fit {self.family} model: " + "; ".join(problems)
            )


def _require_positive_sizes(**sizes: int | None) -> None:
    """Parallel sizes are process counts: 0 or less is a mistake, not "no parallelism" (that is 1);
    refuse it here rather than fail later with a division by zero. None means "not used"."""
    bad = [f"{name}={size}" for name, size in sizes.items() if size is not None and size < 1]
    if bad:
        raise InputError(
            "parallel sizes must be >= 1 (1 means no parallelism of that kind), got "
            + ", ".join(bad)
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
    """The architecture of a named preset (`PRESET_NAMES`).

    Args:
        name: "qwen3_moe", "qwen3_moe_tiny", "phi35_moe" or "phi35_moe_tiny".

    Raises:
        InputError: an unknown name (the presets are listed).
    """
    if name not in _PRESETS:
        raise InputError(
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
    raise InputError(
        f"unsupported HF architecture (model_type={model_type!r}, "
        f"architectures={cfg.get('architectures')}); supported: "
        + ", ".join(f"{a} (model_type {t!r})" for a, t in _HF_ARCHITECTURES.items())
    )


# transformers' config class of each family: it supplies every default a config.json leaves out.
_HF_CONFIG_CLASSES = {"qwen3_moe": "Qwen3MoeConfig", "phimoe": "PhimoeConfig"}
_FAMILY_NAMES = {"qwen3_moe": "Qwen3-MoE", "phimoe": "PhiMoE"}

# Fields that fix the tensors' shapes (a tuple: names any one of which will do). transformers
# would fill a missing one with its class default (Qwen3MoeConfig: 24 layers, 128 experts), which
# describes some other model, so a config.json without one is refused rather than guessed.
_SHAPE_FIELDS = {
    "qwen3_moe": (
        ("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",), ("vocab_size",),
        # The hub's config.json says num_experts; transformers 5.x writes num_local_experts.
        ("num_experts", "num_local_experts"), ("num_experts_per_tok",), ("moe_intermediate_size",),
    ),
    "phimoe": (
        ("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",), ("vocab_size",),
        ("num_local_experts",), ("num_experts_per_tok",), ("intermediate_size",),
    ),
}

# RoPE variants each family's model implements, with what they are (for the error message).
_SUPPORTED_ROPE_TYPES = {
    "qwen3_moe": {"default": "plain RoPE"},
    "phimoe": {"default": "plain RoPE", "longrope": "Phi-3 longrope", "su": "longrope's old name"},
}
_LONGROPE_FIELDS = ("short_factor", "long_factor", "short_mscale", "long_mscale")


def _check_shape_fields(cfg: dict, family: str) -> None:
    missing = [
        " or ".join(names) for names in _SHAPE_FIELDS[family] if not any(n in cfg for n in names)
    ]
    if missing:
        raise InputError(f"HF config is missing required fields: {', '.join(missing)}")


def _rope_type(cfg: dict) -> str:
    """The RoPE variant a config.json asks for, read as transformers reads it: a 4.x
    `rope_scaling` (null for plain RoPE) before 5.x `rope_parameters`; `type` is the old key."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return rope.get("rope_type", rope.get("type", "default"))


def _check_rope_type(cfg: dict, family: str) -> None:
    # Checked on the file itself, before transformers' own validation, which for some types
    # fails on a missing field first (PhimoeConfig: mscales) and would hide the real reason.
    rope_type = _rope_type(cfg)
    supported = _SUPPORTED_ROPE_TYPES[family]
    if rope_type not in supported:
        raise InputError(
            f"{_FAMILY_NAMES[family]} rope scaling {rope_type!r} is not supported; supported "
            "rope_type values: " + ", ".join(f"{t!r} ({what})" for t, what in supported.items())
        )


def _transformers_config(cfg: dict, family: str):
    """transformers' own config object for `cfg` (built from the dict: no hub, no remote code).

    Every field the file leaves out then takes exactly transformers' class default, and the rope
    settings are normalised as transformers does it (4.x `rope_scaling` / `rope_theta` folded
    into `rope_parameters`, the family's default θ) — nothing here can drift from what
    `from_pretrained` reads.
    """
    import transformers

    config_class = getattr(transformers, _HF_CONFIG_CLASSES[family])
    try:
        # A deep copy: transformers fills in the nested rope dict in place.
        return config_class.from_dict(copy.deepcopy(cfg))
    except Exception as e:  # noqa: BLE001 - its validators raise ValueError, TypeError, KeyError
        # and huggingface_hub's StrictDataclassError: whatever it refuses is bad input to us.
        raise InputError(f"HF config is not a valid {config_class.__name__}: {e}") from e


def _rope_settings(hf) -> dict:
    """A transformers config's RoPE settings as one dict (rope_type, rope_theta, scaling fields):
    5.x keeps them in `rope_parameters`; 4.x has `rope_theta` beside `rope_scaling`."""
    params = getattr(hf, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(hf, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return {**scaling, "rope_theta": hf.rope_theta}


def _phimoe_longrope(cfg: dict, hf, rope: dict) -> LongRopeScaling | None:
    if rope["rope_type"] == "default":
        return None
    missing = [k for k in _LONGROPE_FIELDS if k not in rope]
    if missing:
        raise InputError(f"PhiMoE {rope['rope_type']} rope settings lack {', '.join(missing)}")
    return LongRopeScaling(
        short_factor=tuple(float(x) for x in rope["short_factor"]),
        long_factor=tuple(float(x) for x in rope["long_factor"]),
        short_mscale=float(rope["short_mscale"]),
        long_mscale=float(rope["long_mscale"]),
        # The file's top-level field first, as transformers' rope code intends for Phi-3 configs
        # (5.23's PhimoeConfig takes the rope dict's, or max_position_embeddings when the dict
        # has none: the same wherever the file's two fields agree).
        original_max_position_embeddings=int(
            cfg.get("original_max_position_embeddings")
            or rope.get("original_max_position_embeddings")
            or hf.max_position_embeddings
        ),
    )


def _read_config(config: dict | str | os.PathLike) -> dict:
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return read_json_file(path)  # InputError naming the file and line of a bad byte


def from_hf_config(config: dict | str | os.PathLike) -> MoEArchitecture:
    """Architecture from an HF `config.json` (a path to the file or its folder, or a dict).

    Read through transformers' own config class, so a field the file leaves out means what it
    means to transformers (e.g. Qwen3MoeConfig's norm_topk_prob=False, PhimoeConfig's
    router_jitter_noise=0.01); shape fields must be present, unsupported variants are refused.

    Args:
        config: the config.json path, its folder, or the parsed dict.

    Returns:
        The `MoEArchitecture`, its `hf_config` the file's dict.

    Raises:
        InputError: an unreadable file, an unsupported family, RoPE type or variant (dense
            layers, Qwen3 attention bias, PhiMoE top-k other than 2), a missing shape field, or
            a config transformers refuses.
    """
    cfg = _read_config(config)
    family = _family_of(cfg)
    _check_shape_fields(cfg, family)
    _check_rope_type(cfg, family)
    hf = _transformers_config(cfg, family)
    rope = _rope_settings(hf)
    common = dict(
        family=family,
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        # transformers' attention: head_dim when the config has one, else hidden / heads.
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        router_aux_loss_coef=float(hf.router_aux_loss_coef),
        rotary_base=float(rope["rope_theta"]),
        hf_config=cfg,
    )
    if family == "qwen3_moe":
        return _qwen3_moe_architecture(hf, common)
    return _phimoe_architecture(cfg, hf, rope, common)


def _qwen3_moe_architecture(hf, common: dict) -> MoEArchitecture:
    if hf.mlp_only_layers or hf.decoder_sparse_step != 1:
        raise InputError(
            "Qwen3-MoE configs with dense layers (mlp_only_layers / decoder_sparse_step != 1) "
            "are not supported: every layer must be an MoE layer"
        )
    if hf.attention_bias:
        raise InputError("Qwen3-MoE with attention_bias=True is not supported")
    return MoEArchitecture(
        num_experts=hf.num_experts,
        moe_router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        norm="RMSNorm",
        norm_epsilon=hf.rms_norm_eps,
        qk_layernorm=True,
        norm_topk_prob=bool(hf.norm_topk_prob),
        **common,
    )


def _phimoe_architecture(cfg: dict, hf, rope: dict, common: dict) -> MoEArchitecture:
    topk = hf.num_experts_per_tok
    if topk != 2:
        raise InputError(f"PhiMoE sparsemixer routing is top-2 only; config has top-{topk}")
    attention_bias = bool(hf.attention_bias)
    return MoEArchitecture(
        num_experts=hf.num_local_experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=hf.intermediate_size,
        norm="LayerNorm",
        norm_epsilon=hf.rms_norm_eps,  # PhiMoE names its LayerNorm eps so
        qk_layernorm=False,
        add_qkv_bias=attention_bias,
        add_attn_output_bias=attention_bias,
        add_lm_head_bias=bool(hf.lm_head_bias),
        norm_topk_prob=False,
        router="sparsemixer",
        router_jitter_noise=float(hf.router_jitter_noise),
        input_jitter_noise=float(hf.input_jitter_noise),
        longrope=_phimoe_longrope(cfg, hf, rope),
        **common,
    )


def resolve_architecture(preset_or_config: str | os.PathLike | dict) -> MoEArchitecture:
    """The architecture a preset name, an HF config.json (or its folder) or a config dict names.

    Args:
        preset_or_config: a preset name, a path to an HF config.json / checkpoint folder, or a
            config dict; a name that is neither a preset nor an existing path is an unknown
            preset.

    Raises:
        InputError: as `get_preset` or `from_hf_config`.
    """
    if isinstance(preset_or_config, dict):
        return from_hf_config(preset_or_config)
    text = os.fspath(preset_or_config)
    if text in _PRESETS:
        return get_preset(text)
    if os.path.exists(text):
        return from_hf_config(text)
    return get_preset(text)  # raises with the list of presets
