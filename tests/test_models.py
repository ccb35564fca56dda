"""Tiny presets: forward and backward; presets and HF configs; parallel-size errors."""

import dataclasses
import json

import pytest
import torch

from sara_megatron.distributed import ParallelConfig
from sara_megatron.models.architecture import (
    PRESET_NAMES,
    QWEN3_30B_A3B,
    from_hf_config,
    get_preset,
    resolve_architecture,
)
from sara_megatron.models.builder import build_model, causal_attention_mask

# The released Qwen3-30B-A3B config.json, as the hub has it (transformers 4.x key names).
QWEN3_30B_A3B_CONFIG_JSON = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "vocab_size": 151936,
}


@pytest.mark.parametrize("preset", ["qwen3_moe_tiny", "phi35_moe_tiny"])
def test_tiny_forward_backward(single_rank, preset):
    torch.manual_seed(0)
    arch = get_preset(preset)
    model = build_model(arch)
    model.train()
    b, s = 2, 24
    tokens = torch.randint(0, arch.vocab_size, (b, s))
    positions = torch.arange(s).expand(b, s)
    logits = model(tokens, positions, causal_attention_mask(s))
    assert logits.shape == (b, s, arch.padded_vocab_size())
    loss = model(tokens, positions, causal_attention_mask(s), labels=tokens).mean()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    router = model.decoder.layers[0].mlp.router.weight
    if arch.router == "topk":
        assert router.grad.abs().sum() > 0
    # Sparsemixer at random init: almost no token has a second candidate within 2·eps, so the
    # chosen gate is exactly 1 and its derivative 0 (as in transformers); tests/test_phimoe.py
    # checks its gradient on near-tied router rows.


def test_a_deeper_model_after_a_shallower_one_logs_its_load_balancing(single_rank):
    """megatron's per-layer loss tracker is process-wide and sized by the first model that logs
    to it; a deeper model built later in the process logs every layer instead of failing."""
    from sara_megatron.compat.megatron_versions import aux_loss_values, forget_aux_losses

    forget_aux_losses()
    arch = get_preset("qwen3_moe_tiny")
    b, s = 2, 8
    for num_layers in (1, arch.num_layers):
        model = build_model(dataclasses.replace(arch, num_layers=num_layers))
        model.train()
        tokens = torch.randint(0, arch.vocab_size, (b, s))
        model(tokens, torch.arange(s).expand(b, s), causal_attention_mask(s),
              labels=tokens).mean().backward()
    values = aux_loss_values("load_balancing_loss")
    assert values.numel() == arch.num_layers
    assert (values[1:] > 0).all()  # the deeper model's own layers were logged


def test_qwen3_30b_a3b_preset_is_exact():
    a = get_preset("qwen3_moe")
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_query_groups) == (48, 2048, 32, 4)
    assert (a.kv_channels, a.num_experts, a.moe_router_topk, a.moe_ffn_hidden_size) == (128, 128, 8, 768)
    assert (a.vocab_size, a.norm, a.norm_epsilon, a.rotary_base) == (151936, "RMSNorm", 1e-6, 1e6)
    assert a.qk_layernorm and a.norm_topk_prob and not a.tie_word_embeddings
    assert a.padded_vocab_size(tp=8) == 151936


def test_phi35_moe_preset_is_exact():
    a = get_preset("phi35_moe")
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_query_groups) == (32, 4096, 32, 8)
    assert (a.num_experts, a.moe_router_topk, a.moe_ffn_hidden_size, a.vocab_size) == (16, 2, 6400, 32064)
    assert a.norm == "LayerNorm" and a.norm_epsilon == 1e-5 and a.router == "sparsemixer"
    assert a.add_qkv_bias and a.add_attn_output_bias and a.add_lm_head_bias
    assert a.longrope.original_max_position_embeddings == 4096
    assert len(a.longrope.short_factor) == len(a.longrope.long_factor) == a.kv_channels // 2
    assert abs(a.longrope.short_mscale - 1.243163121016122) < 1e-12
    # Padded for Megatron, the same for every TP size that divides it.
    assert {a.padded_vocab_size(tp) for tp in (1, 2, 4, 8)} == {32128}


def test_from_hf_config_qwen3(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, rms_norm_eps=1e-6, rope_theta=1e6,
        norm_topk_prob=True, router_aux_loss_coef=0.001, max_position_embeddings=40960,
    )
    cfg.save_pretrained(tmp_path)
    arch = from_hf_config(tmp_path)
    for field in ("num_layers", "hidden_size", "kv_channels", "num_experts", "moe_router_topk",
                  "moe_ffn_hidden_size", "vocab_size", "rotary_base", "norm_epsilon",
                  "norm_topk_prob", "qk_layernorm", "router_aux_loss_coef"):
        assert getattr(arch, field) == getattr(QWEN3_30B_A3B, field), field
    assert resolve_architecture(str(tmp_path)).num_layers == 48


# Fields a config.json may leave out, each with a default that differs from ours in some way.
_QWEN3_OPTIONAL = ("norm_topk_prob", "router_aux_loss_coef", "max_position_embeddings",
                   "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_parameters",
                   "rope_scaling", "tie_word_embeddings", "head_dim")
_PHIMOE_OPTIONAL = ("router_jitter_noise", "input_jitter_noise", "router_aux_loss_coef",
                    "max_position_embeddings", "num_key_value_heads", "rms_norm_eps",
                    "rope_theta", "rope_parameters", "rope_scaling", "attention_bias",
                    "lm_head_bias", "tie_word_embeddings")


def _config_json_without(tmp_path, config, optional) -> tuple:
    """Save `config`, drop the optional fields from its config.json; (our reading, theirs)."""
    transformers = pytest.importorskip("transformers")
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    for key in optional:
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg))
    return from_hf_config(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)


def test_missing_qwen3_fields_take_transformers_defaults(tmp_path):
    from transformers import Qwen3MoeConfig

    ours, theirs = _config_json_without(tmp_path, Qwen3MoeConfig(
        vocab_size=300, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.0,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ), _QWEN3_OPTIONAL)
    assert theirs.norm_topk_prob is False and theirs.max_position_embeddings == 32768
    assert ours.norm_topk_prob == theirs.norm_topk_prob
    assert ours.router_aux_loss_coef == theirs.router_aux_loss_coef == 0.001
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.num_query_groups == theirs.num_key_value_heads
    assert ours.kv_channels == 64 // 8  # no head_dim: hidden / heads, as transformers' attention
    assert ours.norm_epsilon == theirs.rms_norm_eps
    assert ours.rotary_base == theirs.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings


def test_missing_phimoe_fields_take_transformers_defaults(tmp_path):
    from transformers import PhimoeConfig

    ours, theirs = _config_json_without(tmp_path, PhimoeConfig(
        vocab_size=250, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.0, input_jitter_noise=0.01, router_aux_loss_coef=0.0,
        max_position_embeddings=512, rms_norm_eps=1e-6, attention_bias=True, lm_head_bias=True,
    ), _PHIMOE_OPTIONAL)
    assert theirs.router_jitter_noise == 0.01 and theirs.max_position_embeddings == 131072
    assert ours.router_jitter_noise == theirs.router_jitter_noise
    assert ours.input_jitter_noise == theirs.input_jitter_noise
    assert ours.router_aux_loss_coef == theirs.router_aux_loss_coef == 0.001
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.num_query_groups == theirs.num_key_value_heads  # the class default, 8
    assert ours.norm_epsilon == theirs.rms_norm_eps
    assert ours.rotary_base == theirs.rope_parameters["rope_theta"] == 1e6
    assert ours.longrope is None
    assert ours.add_qkv_bias == ours.add_lm_head_bias == theirs.lm_head_bias is False


def test_shape_fields_are_required():
    # transformers would fill them with another model's sizes; we refuse rather than guess.
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64,
           "num_attention_heads": 4, "vocab_size": 300, "num_experts_per_tok": 2}
    with pytest.raises(ValueError, match="missing required fields: num_experts or "
                                         "num_local_experts, moe_intermediate_size"):
        from_hf_config(cfg)
    assert from_hf_config(dict(cfg, num_local_experts=4, moe_intermediate_size=32)).num_experts == 4


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_qwen3_rope_scaling_is_refused(key):
    cfg = dict(QWEN3_30B_A3B_CONFIG_JSON, **{
        key: {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    with pytest.raises(ValueError, match=r"Qwen3-MoE rope scaling 'yarn' is not supported; "
                                         r"supported rope_type values: 'default' \(plain RoPE\)"):
        from_hf_config(cfg)
    # 4.x spelling ("type"), and scaling that transformers itself would reject for a missing field.
    with pytest.raises(ValueError, match="rope scaling 'dynamic' is not supported"):
        from_hf_config(dict(QWEN3_30B_A3B_CONFIG_JSON, rope_scaling={"type": "dynamic"}))
    plain = dict(QWEN3_30B_A3B_CONFIG_JSON, **{key: {"rope_type": "default", "rope_theta": 1e6}})
    assert from_hf_config(plain).rotary_base == 1e6


def test_unknown_preset_lists_supported():
    with pytest.raises(ValueError) as err:
        get_preset("mixtral")
    for name in PRESET_NAMES:
        assert name in str(err.value)


def test_other_architecture_lists_supported():
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM.*PhiMoEForCausalLM"):
        from_hf_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tp=3), "TP=3 must divide num_attention_heads=4"),
        (dict(tp=4), "TP=4 must divide num_query_groups=2"),
        (dict(ep=3), "EP=3 must divide num_experts=8"),
        (dict(pp=3), "PP=3 must divide num_layers=4"),
    ],
)
def test_parallel_sizes_that_do_not_divide(layout, message):
    # Checked from the architecture alone, before any process group or tensor exists.
    with pytest.raises(ValueError, match=message):
        get_preset("qwen3_moe_tiny").validate_parallel(**layout)


@pytest.mark.parametrize("layout, named", [
    (dict(tp=0), "TP=0"), (dict(ep=0), "EP=0"), (dict(pp=0), "PP=0"), (dict(vpp=0), "VPP=0"),
    (dict(tp=-2, pp=0), "TP=-2, PP=0"),
])
def test_parallel_sizes_below_one_are_value_errors(layout, named):
    # A ValueError (the command lines exit 2 with it), not a ZeroDivisionError.
    with pytest.raises(ValueError, match=f"parallel sizes must be >= 1 .*got {named}$"):
        get_preset("qwen3_moe_tiny").validate_parallel(**layout)


@pytest.mark.parametrize("size", ["tp", "pp", "ep", "cp"])
def test_process_layout_sizes_below_one_are_value_errors(size):
    with pytest.raises(ValueError, match=f"{size} must be >= 1, got 0"):
        ParallelConfig(**{size: 0}).validate_world(8)


def test_world_size_that_does_not_fit():
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        ParallelConfig(tp=2, pp=2).validate_world(6)
    with pytest.raises(ValueError, match="expert parallel size 4 must divide"):
        ParallelConfig(tp=2, ep=4).validate_world(4)
    assert ParallelConfig(tp=2, ep=2).validate_world(4) == 2


def test_padded_vocabulary_takes_no_probability(single_rank):
    torch.manual_seed(0)
    arch = get_preset("phi35_moe_tiny")  # vocab 250, padded to 256 for Megatron
    assert arch.padded_vocab_size() == 256 > arch.vocab_size
    model = build_model(arch).eval()
    s = 12
    tokens = torch.randint(0, arch.vocab_size, (2, s))
    positions = torch.arange(s).expand(2, s)
    with torch.no_grad():
        logits = model(tokens, positions, causal_attention_mask(s))
        per_token = model(tokens, positions, causal_attention_mask(s), labels=tokens)
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.all(probs[..., arch.vocab_size:] == 0)
    # The model's cross-entropy is the one over the real vocabulary only.
    real = torch.nn.functional.cross_entropy(
        logits[..., : arch.vocab_size].float().reshape(-1, arch.vocab_size), tokens.reshape(-1),
        reduction="none").reshape(2, s)
    torch.testing.assert_close(per_token.float(), real, rtol=1e-5, atol=1e-5)
