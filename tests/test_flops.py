"""Model FLOPs per token against torch's own count of the matmuls a forward runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.models.flops import forward_flops_per_token, training_flops_per_token


@pytest.mark.parametrize("preset", ["qwen3_moe_tiny", "phi35_moe_tiny"])
def test_forward_flops_match_counted_matmuls(single_rank, preset):
    arch = get_preset(preset)
    model = build_model(arch)
    b, s = 2, 32
    tokens = torch.randint(0, arch.vocab_size, (b, s))
    with FlopCounterMode(display=False) as counter:
        model(tokens, torch.arange(s).expand(b, s), causal_attention_mask(s), labels=tokens)
    # The local attention multiplies full [S, S] score matrices and masks half of them; the
    # formula counts the causal half only.
    q_width = arch.num_attention_heads * arch.kv_channels
    masked_half = arch.num_layers * 2 * 2 * q_width * (s - (s + 1) / 2) * b * s
    assert counter.get_total_flops() == forward_flops_per_token(arch, s) * b * s + masked_half
    assert training_flops_per_token(arch, s) == 3 * forward_flops_per_token(arch, s)


def test_qwen3_30b_a3b_is_about_twice_its_active_parameters():
    # ~3.3B active parameters (incl. embeddings) -> ~2 × 3.05B matmul FLOPs per token at short S.
    flops = forward_flops_per_token(get_preset("qwen3_moe"), 1)
    assert 5.9e9 < flops < 6.3e9
