"""LoRA adapters (sara_megatron.peft.lora) on one rank: zero-initialised B leaves the base model's
outputs; an adapted model equals its base with the merged weights W + (alpha/r)·B·A written in;
only adapters and the router are trainable."""

import pytest
import torch

from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.peft import LoraSettings, adapters, adapters_disabled, apply_lora

ALL_TARGETS = ("attention_qkv", "attention_proj", "experts_fc1", "experts_fc2")


def _logits(model, tokens):
    s = tokens.shape[1]
    positions = torch.arange(s).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, causal_attention_mask(s))


def _model_and_tokens(preset="qwen3_moe_tiny"):
    torch.manual_seed(0)
    arch = get_preset(preset)
    model = build_model(arch).eval()
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, tokens


@pytest.mark.parametrize("expert_adapters", ["per_expert", "shared"])
@pytest.mark.parametrize("preset", ["qwen3_moe_tiny", "phi35_moe_tiny"])
def test_zero_initialised_b_gives_the_base_model(single_rank, preset, expert_adapters):
    model, tokens = _model_and_tokens(preset)
    base = _logits(model, tokens)
    apply_lora([model], LoraSettings(rank=4, alpha=8, targets=ALL_TARGETS,
                                     expert_adapters=expert_adapters, router="lora"))
    assert torch.equal(_logits(model, tokens), base)


def _merge_into(merged, adapted):
    """`merged` (a second build of the base) with W + (alpha/r)·B·A written into every adapted
    weight of `adapted`."""
    weights = dict(merged.named_parameters())
    scale = None
    for name, module in adapted.named_modules():
        adapter = getattr(module, "lora", None)
        if adapter is None or not hasattr(adapter, "a"):
            continue
        scale = adapter.scale
        with torch.no_grad():
            weights[f"{name}.weight"] += adapter.scale * adapter.b @ adapter.a
    assert scale is not None
    return merged


@pytest.mark.parametrize("router", ["full", "lora"])
@pytest.mark.parametrize("expert_adapters", ["per_expert", "shared"])
def test_adapted_model_equals_its_merged_weights(single_rank, expert_adapters, router):
    model, tokens = _model_and_tokens()
    base_model, _ = _model_and_tokens()  # the same seed: the same weights
    merged, _ = _model_and_tokens()
    apply_lora([model], LoraSettings(rank=4, alpha=8, targets=ALL_TARGETS, b_init_std=0.05,
                                     expert_adapters=expert_adapters, router=router))
    adapted = _logits(model, tokens)
    assert (adapted - _logits(base_model, tokens)).abs().max() > 1e-3  # the adapters act
    torch.testing.assert_close(adapted, _logits(_merge_into(merged, model), tokens),
                               rtol=1e-5, atol=1e-5)
    with adapters_disabled([model]):
        assert torch.equal(_logits(model, tokens), _logits(base_model, tokens))


def test_only_adapters_and_router_are_trainable(single_rank):
    model, _ = _model_and_tokens()
    names = apply_lora([model], LoraSettings(rank=4, targets=("attention_qkv", "experts_fc2")))
    layers = model.decoder.layers
    expected = []
    for i, layer in enumerate(layers):
        expected += [f"chunk0.decoder.layers.{i}.self_attention.linear_qkv.lora_a",
                     f"chunk0.decoder.layers.{i}.self_attention.linear_qkv.lora_b",
                     f"chunk0.decoder.layers.{i}.mlp.router.weight"]
        expected += [f"chunk0.decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.{f}"
                     for j in range(layer.mlp.experts.num_local_experts) for f in ("lora_a", "lora_b")]
    assert sorted(names) == sorted(expected)
    qkv = layers[0].self_attention.linear_qkv
    assert qkv.lora_a.shape == (4, qkv.input_size)
    assert qkv.lora_b.shape == (qkv.output_size_per_partition, 4)
    assert not qkv.weight.requires_grad


def _lora_trainer(tmp_path=None, **overrides):
    """A one-process LoRA Trainer on the tiny model (random base from the seed), mock data."""
    from sara_megatron.training import Trainer, load_train_config

    values = {"model.preset": "qwen3_moe_tiny", "data.mock": True, "data.seq_length": 32,
              "sara.layers": "all", "optim.train_steps": 2, "optim.lr": 1e-2,
              "data.micro_batch_size": 2, "data.global_batch_size": 4, "peft.method": "lora",
              "peft.rank": 4, **overrides}
    if tmp_path is not None:
        values["checkpoint.save_dir"] = tmp_path / "ckpt"
    return Trainer(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))


@pytest.mark.parametrize("router", ["full", "frozen"])
def test_a_step_changes_only_the_adapters_and_the_router(single_rank, router):
    trainer = _lora_trainer(**{"peft.router": router})
    module = trainer.chunks[0].module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.train_step()
    trainer.train_step()  # B is zero before the first step: A moves from the second on
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if n.endswith(("lora_a", "lora_b"))}
    routers = {n for n in before if n.endswith("mlp.router.weight")}
    assert adapters and changed >= adapters
    assert changed == adapters | (routers if router == "full" else set())
    # The optimizer holds state for the trainable parameters only.
    held = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert held == sum(before[n].numel() for n in adapters | (routers if router == "full" else set()))


def test_checkpoint_holds_adapters_and_router_only_and_refuses_another_base(single_rank,
                                                                           tmp_path):
    from megatron.core import dist_checkpointing

    from sara_megatron.training.preflight import PreflightError

    trainer = _lora_trainer(tmp_path)
    trainer.run()
    folder = tmp_path / "ckpt" / "iter_0000002"
    saved = dist_checkpointing.load_common_state_dict(str(folder))
    assert saved["trainer"]["peft"]["base_fingerprint"] == "random-init:qwen3_moe_tiny:1234"
    keys = {t.key for t in dist_checkpointing.load_tensors_metadata(str(folder)).values()}
    model_keys = {k for k in keys if not k.startswith("optimizer")}
    assert model_keys and all(k.endswith(("lora_a", "lora_b", "router.weight"))
                              for k in model_keys), sorted(model_keys)
    # Resuming onto another base (here: another seed's random base) is refused in one line.
    with pytest.raises(PreflightError) as err:
        _lora_trainer(tmp_path, seed=7, **{"optim.train_steps": 4})
    base = [p for p in err.value.problems if "trained on base" in p]
    assert len(base) == 1 and "\n" not in base[0], err.value.problems


def _adapter_grads(trainer):
    return {n: p.main_grad.detach().clone() for n, p in trainer.chunks[0].module.named_parameters()
            if p.requires_grad}


def test_aes_trains_the_adapters(single_rank):
    """AES with LoRA (router trained): its terms are computed and their gradient reaches the
    adapters (the step differs from AES at zero coefficients, which is the plain LoRA step)."""
    zero = _lora_trainer(**{"sara.objective": "aes", "aes.variance_coeff": 0,
                            "aes.orthogonality_coeff": 0, "sara.lambda_js": 0})
    zero_record = zero.train_step()
    zero_grads = _adapter_grads(zero)
    aes = _lora_trainer(**{"sara.objective": "aes", "aes.variance_coeff": 10.0,
                           "aes.orthogonality_coeff": 10.0, "sara.lambda_js": 0})
    record = aes.train_step()
    grads = _adapter_grads(aes)
    assert record.terms["aes_variance"] > 0 and record.terms["aes_orthogonality"] > 0
    assert record.ce == zero_record.ce
    lora_b = [n for n in grads if n.endswith("lora_b")]
    assert lora_b and any(not torch.equal(grads[n], zero_grads[n]) for n in lora_b)
    assert any(not torch.equal(grads[n], zero_grads[n]) for n in grads if "router" in n)


def test_online_base_priors_leave_the_adapters_out(single_rank, sara_data):
    """sara.priors online with peft.online_priors base: the anchor forward routes as the base
    model does (the priors equal those of the same model with B = 0) while the adapters act on
    the training forward; `adapted` takes the adapted model's routing."""
    from sara_megatron.training.step import fetch_microbatches, prepare_batch

    def priors(online_priors, zero_b):
        trainer = _lora_trainer(**{
            "data.mock": False, "model.checkpoint": sara_data["checkpoint"],
            "data.shards_dir": sara_data["shards"], "data.seq_length": 64,
            "sara.priors": "online", "peft.online_priors": online_priors})
        gen = torch.Generator().manual_seed(0)
        for module, adapter in adapters(trainer.chunks):
            with torch.no_grad():
                adapter.b.copy_(torch.zeros_like(adapter.b) if zero_b
                                else torch.randn(adapter.b.shape, generator=gen) * 0.5)
        state = trainer.state
        microbatches = fetch_microbatches(state, state.plan.num_microbatches)
        batch = prepare_batch(state, trainer.cfg, microbatches)
        return torch.cat([mb.priors.flatten() for mb in batch.microbatches])

    base = priors("base", zero_b=False)
    torch.testing.assert_close(base, priors("adapted", zero_b=True), rtol=0, atol=1e-6)
    assert (priors("adapted", zero_b=False) - base).abs().max() > 1e-4
