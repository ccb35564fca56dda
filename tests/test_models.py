"""Tiny presets: forward and backward; presets and HF configs; parallel-size errors."""

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
