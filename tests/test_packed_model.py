"""Packed rows through the model: every sample gets the logits and per-layer routing means of its
own unpacked forward (padded to the row length, as training pads it), on both tiny families and on
both sides of Phi's longrope switch; a packed step's gradients (CE over response tokens + LB over
real tokens + SARA per sample against its own prior) equal those of the same samples one per row;
the thd inputs (cu_seqlens) for Transformer Engine."""

import numpy as np
import pytest
import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.packing import first_fit_decreasing, pack_rows_tokens
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.models.packed_attention import (
    check_packing_supported,
    packed_attention_mask,
    packed_cu_seqlens,
    packed_rope,
    thd_packed_inputs,
)
from sara_megatron.routing import capture_routing, observe_routers, segment_ids_from_padding_mask
from sara_megatron.sara import SaraRoutingLoss

LENGTHS = (9, 17, 5, 30, 12, 21)


def samples(vocab, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n) for n in lengths], [min(3, n - 1) for n in lengths]


def packed_batch(seqs, prompts, s):
    rows = first_fit_decreasing([len(x) for x in seqs], s)
    packed = pack_rows_tokens([[seqs[i] for i in row] for row in rows],
                              [[prompts[i] for i in row] for row in rows], s)
    order = [i for row in rows for i in row]  # segment k is sample order[k]
    return packed, order


def packed_forward(model, packed, **kwargs):
    with packed_rope(model, packed.position_ids):
        return model(packed.tokens, packed.position_ids, packed_attention_mask(packed.segment_ids),
                     padding_mask=packed.padding_mask, **kwargs)


def padded_forward(model, batch, **kwargs):
    b, s = batch.tokens.shape
    return model(batch.tokens, torch.arange(s).expand(b, s), causal_attention_mask(s),
                 padding_mask=batch.padding_mask, **kwargs)


@pytest.mark.parametrize("preset,s", [("qwen3_moe_tiny", 48), ("phi35_moe_tiny", 48),
                                      ("phi35_moe_tiny", 96)],
                         ids=["qwen3", "phi-short-rope", "phi-long-rope"])
def test_packed_forward_gives_each_sample_its_own_forward(single_rank, preset, s):
    torch.manual_seed(0)
    arch = get_preset(preset)
    model = build_model(arch).eval()
    seqs, prompts = samples(arch.vocab_size)
    packed, order = packed_batch(seqs, prompts, s)
    assert packed.tokens.shape[0] < len(seqs)  # several samples share a row
    with torch.no_grad(), capture_routing(model, packed.segment_ids, num_segments=len(seqs)) as cap:
        logits = packed_forward(model, packed)
    layers = sorted(cap.records)
    assert layers == list(range(arch.num_layers))
    for k, i in enumerate(order):
        n = len(seqs[i])
        row, col = torch.nonzero(packed.segment_ids == k)[0].tolist()
        # The sample's own forward, padded to the row length as the unpacked run pads it.
        alone = pack_tokens([seqs[i]], [prompts[i]], seq_length=s)
        with torch.no_grad(), capture_routing(model, segment_ids_from_padding_mask(alone.padding_mask)) as ref:
            want = padded_forward(model, alone)
        torch.testing.assert_close(logits[row, col:col + n], want[0, :n], rtol=0, atol=1e-5)
        for layer in layers:
            torch.testing.assert_close(cap[layer].seq_mean[k], ref[layer].seq_mean[0], rtol=0,
                                       atol=1e-5)


def test_rope_rotates_each_token_by_its_own_position(single_rank):
    """(RoPE scores depend on position differences only, so within-sample attention alone would
    hide a wrong offset up to rounding: the table itself is checked.)"""
    arch = get_preset("qwen3_moe_tiny")
    model = build_model(arch).eval()
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    table = model.rotary_pos_emb(6)
    with packed_rope(model, positions):
        per_token = model.rotary_pos_emb(6)
    assert table.shape[1:3] == (1, 1) and per_token.shape == (6, 2, 1, table.shape[-1])
    for b in range(2):
        for t in range(6):
            assert torch.equal(per_token[t, b, 0], table[positions[b, t], 0, 0])
    assert model.rotary_pos_emb(6).shape == table.shape  # the hook is gone afterwards


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_step_gradients_equal_the_padded_samples(single_rank):
    """CE summed over response tokens, megatron's LB over real tokens, SARA per sample against its
    own prior: the same gradients whether the samples sit in packed rows or one per row."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    torch.manual_seed(0)
    arch = get_preset("qwen3_moe_tiny")
    model = build_model(arch)
    model.train()
    assert model.config.moe_aux_loss_coeff > 0
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    seqs, prompts = samples(arch.vocab_size, seed=1)
    s = 48
    rng = np.random.default_rng(2)
    layers = [1, 2]
    priors = torch.from_numpy(rng.dirichlet(np.ones(arch.num_experts), (len(layers), len(seqs)))
                              ).float()
    sara = SaraRoutingLoss(layers, coeff=0.7)

    def step(forward, batch, segment_ids, sample_priors, packed):
        model.zero_grad(set_to_none=True)
        sara.set_batch(sample_priors, segment_ids, packed=packed)
        with observe_routers(model, sara):
            per_token = forward(model, batch, labels=batch.labels)
        loss = (per_token.float() * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        return _grads(model), float(loss)

    packed, order = packed_batch(seqs, prompts, s)
    got, got_ce = step(packed_forward, packed, packed.segment_ids, priors[:, order], True)
    alone = pack_tokens(seqs, prompts, seq_length=s)
    want, want_ce = step(padded_forward, alone, segment_ids_from_padding_mask(alone.padding_mask),
                         priors, False)
    assert got_ce == pytest.approx(want_ce, abs=1e-6)
    assert got.keys() == want.keys() and any(n.endswith("router.weight") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_step_gradients_equal_each_sample_alone(single_rank):
    """The plainest reference: each sample's own forward and backward on exactly its tokens (no
    padding, no batch mates), its CE summed over its response tokens and divided by the step's
    count, its SARA term weighted 1/samples; the gradients summed over the samples. Megatron's LB
    is a statistic of a micro-batch's tokens, not a sum over samples: off here (the padded
    comparison above has it)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from sara_megatron.models.builder import ModelOptions

    torch.manual_seed(0)
    arch = get_preset("qwen3_moe_tiny")
    model = build_model(arch, ModelOptions(moe_aux_loss_coeff=0.0))
    model.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    seqs, prompts = samples(arch.vocab_size, seed=3)
    rng = np.random.default_rng(4)
    layers = [0, 3]
    priors = torch.from_numpy(rng.dirichlet(np.ones(arch.num_experts), (len(layers), len(seqs)))
                              ).float()

    packed, order = packed_batch(seqs, prompts, 48)
    response_tokens = packed.loss_mask.sum()
    sara = SaraRoutingLoss(layers, coeff=0.7)
    sara.set_batch(priors[:, order], packed.segment_ids, packed=True)
    model.zero_grad(set_to_none=True)
    with observe_routers(model, sara):
        per_token = packed_forward(model, packed, labels=packed.labels)
    packed_ce = (per_token.float() * packed.loss_mask).sum() / response_tokens
    packed_ce.backward()
    got = _grads(model)

    one_sara = SaraRoutingLoss(layers, coeff=0.7 / len(seqs))
    model.zero_grad(set_to_none=True)
    ce, counted = 0.0, 0.0
    for i, (seq, prompt) in enumerate(zip(seqs, prompts)):
        alone = pack_tokens([seq], [prompt])
        assert alone.tokens.shape == (1, len(seq)) and not alone.padding_mask.any()
        one_sara.set_batch(priors[:, i:i + 1], segment_ids_from_padding_mask(alone.padding_mask))
        with observe_routers(model, one_sara):
            per_token = padded_forward(model, alone, labels=alone.labels)
        loss = (per_token.float() * alone.loss_mask).sum() / response_tokens
        loss.backward()  # gradients add up over the samples
        ce, counted = ce + float(loss), counted + float(alone.loss_mask.sum())
    want = _grads(model)
    assert counted == float(response_tokens)
    assert float(packed_ce) == pytest.approx(ce, abs=1e-6)
    assert got.keys() == want.keys() and any(n.endswith("router.weight") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_thd_inputs_for_transformer_engine():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 3, 3]])
    assert packed_cu_seqlens(segments).tolist() == [0, 3, 5, 6, 10, 12]
    # a row that ends inside one sample id starts a new run at the next row
    assert packed_cu_seqlens(torch.tensor([[0, 0], [0, 0]])).tolist() == [0, 2, 4]
    tokens = torch.arange(12).reshape(2, 6)
    flat_tokens, flat_positions, _, params = thd_packed_inputs(tokens, tokens * 0, segments)
    assert flat_tokens.shape == (1, 12) and params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 4


def test_refusals():
    phi = get_preset("phi35_moe_tiny")
    check_packing_supported(phi, 96, use_te=False, context_parallel=1)
    check_packing_supported(phi, 64, use_te=True, context_parallel=1)
    with pytest.raises(ValueError, match="longest packed sample"):
        check_packing_supported(phi, 96, use_te=True, context_parallel=1)
    check_packing_supported(get_preset("qwen3_moe_tiny"), 64, use_te=False, context_parallel=2)
    with pytest.raises(NotImplementedError, match="context parallel"):
        check_packing_supported(get_preset("qwen3_moe_tiny"), 64, use_te=True, context_parallel=2)
