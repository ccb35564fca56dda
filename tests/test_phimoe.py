"""PhiMoE pieces against transformers' `phimoe`: sparsemixer routing, longrope, biases, and a whole
tiny PhiMoE whose logits must match `PhimoeForCausalLM` on the same weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import PhimoeConfig, PhimoeForCausalLM  # noqa: E402
from transformers.models.phimoe import modeling_phimoe as hf_phimoe  # noqa: E402

from sara_megatron.conversion.hf_import import load_hf_weights  # noqa: E402
from sara_megatron.distributed import (  # noqa: E402
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
)
from sara_megatron.models.architecture import (  # noqa: E402
    LongRopeScaling,
    from_hf_config,
    get_preset,
)
from sara_megatron.models.builder import (  # noqa: E402
    ModelOptions,
    build_model,
    causal_attention_mask,
    transformer_config,
)
from sara_megatron.models.phimoe import (  # noqa: E402
    LongRopeRotaryEmbedding,
    SparseMixerRouter,
    sparsemixer_top2,
)
from sara_megatron.models.phimoe_longrope import PHI35_MOE_LONGROPE  # noqa: E402

JITTER = 0.01


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """Megatron parallel state on a one-process gloo group, torn down when the module ends."""
    initialize_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def _logits_with_near_ties(tokens: int, experts: int, seed: int) -> torch.Tensor:
    """Random router logits plus rows that sit on every decision boundary sparsemixer has."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    n = tokens // 8
    top = logits[:n].max(dim=-1, keepdim=True).values
    logits[:n, 3] = top[:, 0]  # exact ties for the first expert
    logits[n : 2 * n, 5] = logits[n : 2 * n].max(dim=-1).values - 1e-6  # near-ties
    # A runner-up exactly on / one ulp either side of the 2·eps relative threshold.
    rows = logits[2 * n : 3 * n]
    best = rows.abs().max(dim=-1).values + 1.0
    rows[:, 0] = best
    for j, nudge in enumerate((0.0, 1e-7, -1e-7)):
        rows[j::3, 1] = best[j::3] * (1 - 2 * JITTER + nudge)
    rows[:, 2] = rows[:, 1] * (1 - 1e-7)  # second expert near-tie below the runner-up
    return logits


# --- Sparsemixer router -----------------------------------------------------------------------


def test_sparsemixer_eval_equals_transformers_function():
    """Same experts and bitwise-same weights as transformers' `sparsemixer(training=False)`."""
    logits = _logits_with_near_ties(768, 16, seed=0)
    ours_w, ours_e = sparsemixer_top2(logits, JITTER, training=False)
    hf_w, hf_e = hf_phimoe.sparsemixer(logits.clone(), jitter_eps=JITTER, training=False)
    assert torch.equal(ours_e, hf_e)
    assert torch.equal(ours_w, hf_w)
    assert (ours_e[:, 0] != ours_e[:, 1]).all()


def _router(aux_coeff: float = 0.0, num_experts: int = 8) -> SparseMixerRouter:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    arch = dataclasses.replace(get_preset("phi35_moe_tiny"), num_experts=num_experts)
    config = transformer_config(arch, ModelOptions(moe_aux_loss_coeff=aux_coeff))
    router = SparseMixerRouter(
        config=config, pg_collection=get_default_pg_collection(), jitter_eps=JITTER
    )
    router.set_layer_number(1)
    return router


def test_router_eval_equals_transformers_router():
    """Router module on hidden states: experts and weights of transformers' `PhimoeTopKRouter`
    (same router weight; two nearly parallel expert rows make near-ties on every token)."""
    torch.manual_seed(1)
    router = _router(num_experts=8).eval()
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.weight[5] = router.weight[2] + 1e-4 * torch.randn(router.weight.shape[1])
    hf_cfg = PhimoeConfig(
        hidden_size=router.weight.shape[1], num_local_experts=8, num_experts_per_tok=2,
        router_jitter_noise=JITTER, input_jitter_noise=JITTER,
    )
    hf_router = hf_phimoe.PhimoeTopKRouter(hf_cfg).eval()
    hf_router.weight.data.copy_(router.weight.data)

    s, b = 96, 4  # 384 tokens, Megatron [S, B, H] order
    hidden = torch.randn(s, b, router.weight.shape[1])
    with torch.no_grad():
        probs, routing_map = router(hidden)
        hf_logits, hf_w, hf_e = hf_router(hidden.reshape(s * b, -1).clone())
    assert probs.shape == routing_map.shape == (s * b, 8)
    expected_map = torch.zeros_like(routing_map).scatter(1, hf_e, True)
    assert torch.equal(routing_map, expected_map)
    torch.testing.assert_close(probs.gather(1, hf_e), hf_w, rtol=0, atol=1e-6)
    assert (probs[~routing_map] == 0).all()


def test_sparsemixer_training_equals_transformers_seeded():
    """Training mode with the same seed: the same sampled experts, forward weights (Heun factor
    included) and custom gradient w.r.t. the logits as transformers'
    `sparsemixer(training=True)`."""
    base = _logits_with_near_ties(512, 16, seed=2) * 0.05  # flat logits: sampling often differs
    upstream = torch.randn(512, 2)
    ours_logits = base.clone().requires_grad_()
    hf_logits = base.clone().requires_grad_()
    torch.manual_seed(7)
    ours_w, ours_e = sparsemixer_top2(ours_logits, JITTER, training=True)
    torch.manual_seed(7)
    hf_w, hf_e = hf_phimoe.sparsemixer(hf_logits, jitter_eps=JITTER, training=True)
    assert torch.equal(ours_e, hf_e)
    assert torch.equal(ours_w, hf_w)
    (ours_w * upstream).sum().backward()
    (hf_w * upstream).sum().backward()
    torch.testing.assert_close(ours_logits.grad, hf_logits.grad, rtol=1e-6, atol=1e-7)
    # It really sampled: some picks are not the eval (argmax) picks.
    _, eval_e = sparsemixer_top2(base, JITTER, training=False)
    assert (ours_e != eval_e).any()


def test_router_training_shapes_topk_and_gradients():
    """Training router: probs/map [T, N], exactly two experts per token, each weight a masked
    softmax probability (times 1 or 1/3) in (0, 1], finite non-zero gradient to the router weight.
    (Exact values and gradients are compared with transformers in the seeded test above.)"""
    torch.manual_seed(3)
    router = _router().train()
    h = router.weight.shape[1]
    with torch.no_grad():  # logits = common part + spread: some tokens keep several candidates
        router.weight.copy_(0.5 + 0.1 * torch.randn_like(router.weight))
    s, b = 64, 3
    hidden = 1.0 + 0.1 * torch.randn(s, b, h)
    probs, routing_map = router(hidden)
    assert probs.shape == routing_map.shape == (s * b, router.config.num_moe_experts)
    assert routing_map.dtype == torch.bool and (routing_map.sum(-1) == 2).all()
    assert (probs[~routing_map] == 0).all() and (probs[routing_map] > 0).all()
    assert (probs <= 1).all() and (probs[routing_map] < 1).any()
    (probs * torch.randn_like(probs)).sum().backward()
    grad = router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_router_aux_loss_attaches_when_enabled():
    """moe_aux_loss_coeff > 0: Megatron's load-balancing loss rides on the probs (its gradient
    reaches the router even when the main loss ignores the probs); coeff 0: nothing attached."""
    hidden = torch.randn(32, 2, 64)
    grads = {}
    for coeff in (0.0, 0.1):
        torch.manual_seed(4)
        router = _router(aux_coeff=coeff, num_experts=4).train()
        probs, _ = router(hidden)
        (probs * 0).sum().backward()
        grads[coeff] = router.weight.grad.abs().sum().item()
    assert grads[0.0] == 0.0 and grads[0.1] > 0.0


# --- Longrope ---------------------------------------------------------------------------------


def _hf_rotary_fixed(rotary):
    """transformers 5.23's `PhimoeRotaryEmbedding.forward` recomputes `inv_freq` without the
    sequence length, so it never uses `long_factor` (its `dynamic_rope_update` decorator does
    switch the `inv_freq` buffer, and the mscale does switch). Make the forward use that buffer:
    the documented longrope rule, and what Microsoft's PhiMoE code and transformers 4.x do."""
    rotary.rope_init_fn = lambda config, *args, **kwargs: (rotary.inv_freq, 1.0)
    return rotary


def _tiny_longrope(head_dim=16, switch=32, long_mscale=None) -> LongRopeScaling:
    g = torch.Generator().manual_seed(5)
    half = head_dim // 2
    short = (1.0 + torch.rand(half, generator=g)).tolist()
    long = (1.0 + 20 * torch.rand(half, generator=g)).sort().values.tolist()
    m = PHI35_MOE_LONGROPE.short_mscale
    return LongRopeScaling(tuple(short), tuple(long), m, long_mscale or m, switch)


def _hf_config(longrope: LongRopeScaling, **overrides) -> PhimoeConfig:
    kwargs = dict(
        vocab_size=250, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, attention_bias=True,
        lm_head_bias=True, router_jitter_noise=JITTER, input_jitter_noise=JITTER,
        router_aux_loss_coef=0.0, rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0,
            short_factor=list(longrope.short_factor), long_factor=list(longrope.long_factor),
            short_mscale=longrope.short_mscale, long_mscale=longrope.long_mscale,
            original_max_position_embeddings=longrope.original_max_position_embeddings,
        ),
    )
    kwargs.update(overrides)
    return PhimoeConfig(**kwargs)


@pytest.mark.parametrize("long_mscale", [None, 1.5])
def test_longrope_cos_sin_equal_transformers(long_mscale):
    """cos·mscale and sin·mscale of our rotary embedding equal transformers' below, at and above
    the switch (short factors and short mscale up to 32 positions, long ones beyond)."""
    lr = _tiny_longrope(long_mscale=long_mscale)
    hf_rotary = _hf_rotary_fixed(hf_phimoe.PhimoeRotaryEmbedding(_hf_config(lr)))
    ours = LongRopeRotaryEmbedding(
        kv_channels=16, longrope=lr, rotary_base=10000.0, use_cpu_initialization=True
    )
    for seq in (7, 32, 33, 100):
        emb = ours(seq)  # [S, 1, 1, head_dim] angles
        assert emb.shape == (seq, 1, 1, 16)
        cos = torch.cos(emb[:, 0, 0]) * ours.mscale(seq)
        sin = torch.sin(emb[:, 0, 0]) * ours.mscale(seq)
        hf_cos, hf_sin = hf_rotary(torch.zeros(1), torch.arange(seq)[None])
        torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=2e-6)
        torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=2e-6)
        assert ours.uses_long_factors(seq) == (seq > 32)
    # The released factors make the two regimes really different.
    assert PHI35_MOE_LONGROPE.long_factor[-1] > 60 > PHI35_MOE_LONGROPE.short_factor[-1]


# --- A whole tiny PhiMoE against PhimoeForCausalLM --------------------------------------------


@pytest.mark.parametrize("long_mscale", [None, 1.5], ids=["mscale_equal", "mscale_differ"])
def test_tiny_phimoe_logits_equal_transformers(tmp_path, long_mscale):
    """Our `build_model(from_hf_config(config.json))` with the weights of a random
    `PhimoeForCausalLM` (o_proj / q,k,v / lm_head biases, LayerNorm biases, longrope with a switch
    at 32 positions, sparsemixer routing, vocab 250 -> padded 256) gives the same fp32 eval logits
    for a sequence below the switch and one above it."""
    lr = _tiny_longrope(long_mscale=long_mscale)
    cfg = _hf_config(lr, attn_implementation="eager")
    torch.manual_seed(10)
    hf = PhimoeForCausalLM(cfg).eval()
    with torch.no_grad():  # every parameter random and O(1)-relevant, biases and norms included
        for name, p in hf.named_parameters():
            if "layernorm" in name or "model.norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name or "router" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path)
    _hf_rotary_fixed(hf.model.rotary_emb)

    arch = from_hf_config(tmp_path)
    assert arch.longrope == lr and arch.add_lm_head_bias and arch.add_attn_output_bias
    assert arch.rotary_base == 10000.0 and arch.router_jitter_noise == JITTER
    model = build_model(arch).eval()
    load_hf_weights(model, tmp_path)  # the converter's mapping (sara_megatron/conversion)

    for seq in (24, 48):  # below and above the switch at 32
        torch.manual_seed(seq)
        ids = torch.randint(0, cfg.vocab_size, (2, seq))
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
            got = model(ids, torch.arange(seq).expand(2, seq), causal_attention_mask(seq))
        assert got.shape == (2, seq, arch.padded_vocab_size())
        diff = (got[..., : cfg.vocab_size] - expected).abs().max().item()
        assert diff <= 1e-4, f"seq {seq}: max |logits diff| = {diff}"
        assert expected.abs().max() > 1.0  # the comparison is not vacuous


def test_from_hf_config_transformers4_style_longrope():
    """A 4.x-style config.json (`rope_scaling`, no rope_theta) parses like transformers 5 does:
    PhimoeConfig's default θ is 1e6; a non-longrope scaling type is refused."""
    lr = PHI35_MOE_LONGROPE
    cfg = json.loads(_hf_config(lr).to_json_string())
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = dict(
        type="longrope", short_factor=list(lr.short_factor), long_factor=list(lr.long_factor),
        short_mscale=lr.short_mscale, long_mscale=lr.long_mscale,
    )
    cfg["original_max_position_embeddings"] = 4096
    cfg.update(hidden_size=4096, num_attention_heads=32)  # head_dim 128: 64 factors
    arch = from_hf_config(cfg)
    assert arch.longrope == lr and arch.rotary_base == 1_000_000.0
    cfg["rope_scaling"] = None
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="yarn"):
        from_hf_config(cfg)


# --- The tiny preset ----------------------------------------------------------------------------


def test_phi35_moe_tiny_forward_backward():
    """phi35_moe_tiny in training mode (sampling router, input jitter) across the longrope switch:
    finite loss, a gradient on every parameter, biases and routers included.

    Sparsemixer gives a router gradient only through tokens whose pick has a competitor within
    the 2·eps relative threshold (a lone candidate has probability 1, derivative 0). At random
    init hardly any token has one, so each router's expert rows are set close together here.
    """
    torch.manual_seed(0)
    arch = get_preset("phi35_moe_tiny")
    model = build_model(arch).train()
    with torch.no_grad():
        for layer in model.decoder.layers:
            w = layer.mlp.router.weight
            w.copy_(w[:1] + 1e-4 * torch.randn_like(w))
    b, s = 2, arch.longrope.original_max_position_embeddings + 16
    tokens = torch.randint(0, arch.vocab_size, (b, s))
    positions = torch.arange(s).expand(b, s)
    loss = model(tokens, positions, causal_attention_mask(s), labels=tokens)
    assert loss.shape == (b, s) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = dict(model.named_parameters())
    missing = [n for n, p in grads.items() if p.requires_grad and p.grad is None]
    assert not missing
    nonzero = ["output_layer.bias"] + [
        f"decoder.layers.{i}.{n}" for i in range(arch.num_layers)
        for n in ("self_attention.linear_proj.bias", "self_attention.linear_qkv.bias",
                  "mlp.router.weight")
    ]
    for name in nonzero:
        assert grads[name].grad.abs().sum() > 0, name
    assert all(torch.isfinite(p.grad).all() for p in grads.values())
    # Training is stochastic (sampling + jitter); eval is deterministic.
    model.eval()
    with torch.no_grad():
        mask = causal_attention_mask(s)
        a, b2 = model(tokens, positions, mask), model(tokens, positions, mask)
        model.train()
        c = model(tokens, positions, mask)
    assert torch.equal(a, b2) and not torch.equal(a, c)


def test_input_jitter_scales_moe_input_in_training_only():
    """PhiMoE's input jitter: in training the MoE input (what the router and, through dispatch,
    the experts receive) is multiplied elementwise by U(1−ε, 1+ε); in eval it is untouched."""
    arch = get_preset("phi35_moe_tiny")
    eps = arch.input_jitter_noise
    moe = build_model(arch).decoder.layers[0].mlp
    seen = []
    moe.router.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.randn(8, 2, arch.hidden_size)
    with torch.no_grad():
        moe.train()(x)
        moe.eval()(x)
    ratio = seen[0] / x
    assert not torch.equal(seen[0], x)
    assert (ratio >= 1 - eps - 1e-6).all() and (ratio <= 1 + eps + 1e-6).all()
    assert torch.equal(seen[1], x)
