"""The layout planner's LoRA case (sara_megatron/planning/lora.py, tools/plan_layout.py --lora-*):
per-rank adapter and trained-parameter counts equal the ones worked out here by hand from the tiny
Qwen3-MoE's shapes, the memory follows the stated bytes per parameter, and the tool's flags."""

import importlib
import json

import pytest

from sara_megatron.models.architecture import get_preset
from sara_megatron.planning.lora import LoraSpec, lora_parameter_table
from sara_megatron.planning.memory import Layout, TrainingShape, plan_layout, plan_layouts
from sara_megatron.planning.parameters import (
    build_meta_model,
    parameter_table,
    stage_parameters,
    total_parameters,
)

ALL = ("attention_qkv", "attention_proj", "experts_fc1", "experts_fc2")
_tables = {}


def base_table(preset="qwen3_moe_tiny"):
    if preset not in _tables:
        arch = get_preset(preset)
        _tables[preset] = (arch, parameter_table(build_meta_model(arch)))
    return _tables[preset]


# The tiny Qwen3-MoE, by hand: 4 layers, hidden 64, 4 query heads and 2 KV groups of width 32,
# 8 experts (top-2) of FFN width 32, vocabulary 256.
L, H, N, F = 4, 64, 8, 32
QKV_OUT, Q = (4 + 2 * 2) * 32, 4 * 32          # fused QKV rows; linear_proj's input
FC1_OUT = 2 * F                                  # [gate; up]


def by_hand(r, *, tp=1, ep=1, expert_adapters="per_expert", router="full", targets=ALL):
    """(trained dense, trained expert) parameters on one rank of one pipeline stage holding
    `layers` layers, from the sharding rules: column-parallel B and row-parallel A split over TP,
    the other factor whole; per-expert adapters on their EP rank, shared ones on every rank."""
    dense = expert = 0
    if "attention_qkv" in targets:
        dense += r * H + QKV_OUT // tp * r       # A [r, h] whole, B [qkv/t, r]
    if "attention_proj" in targets:
        dense += r * (Q // tp) + H * r           # A [r, q/t], B [h, r] whole
    fc = 0
    if "experts_fc1" in targets:
        fc += r * H + FC1_OUT // tp * r
    if "experts_fc2" in targets:
        fc += r * (F // tp) + H * r
    if expert_adapters == "per_expert":
        expert += fc * N // ep
    else:
        dense += fc
    dense += {"full": N * H, "lora": r * H + N * r, "frozen": 0}[router]
    return dense, expert


@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("expert_adapters", ["per_expert", "shared"])
@pytest.mark.parametrize("router", ["full", "lora", "frozen"])
@pytest.mark.parametrize("tp,ep,pp", [(1, 1, 1), (2, 2, 2), (2, 1, 1), (1, 4, 4)])
def test_trained_counts_by_hand(r, expert_adapters, router, tp, ep, pp):
    arch, table = base_table()
    spec = LoraSpec(rank=r, targets=ALL, expert_adapters=expert_adapters, router=router)
    lora_table = lora_parameter_table(table, arch, spec)
    base_stages = stage_parameters(table, arch, tp=tp, ep=ep, pp=pp)
    stages = stage_parameters(lora_table, arch, tp=tp, ep=ep, pp=pp)
    dense, expert = by_hand(r, tp=tp, ep=ep, expert_adapters=expert_adapters, router=router)
    layers = L // pp
    for base, stage in zip(base_stages, stages):
        assert (stage.trainable_dense, stage.trainable_expert) == (layers * dense, layers * expert)
        # Held = frozen base + adapters (the router, trained or not, is in the base).
        adapters = layers * (dense + expert - (N * H if router == "full" else 0))
        assert stage.total == base.total + adapters
        # Full fine-tuning trains everything it holds.
        assert (base.trainable_dense, base.trainable_expert) == (base.dense, base.expert)


def test_targets_subset_and_whole_model_totals():
    arch, table = base_table()
    spec = LoraSpec(rank=4, targets=("attention_qkv", "experts_fc2"), router="frozen")
    lora_table = lora_parameter_table(table, arch, spec)
    dense, expert = by_hand(4, targets=spec.targets, router="frozen")
    assert total_parameters(lora_table, arch, trainable_only=True) == L * (dense + expert)
    assert total_parameters(lora_table, arch) == total_parameters(table, arch) + L * (dense + expert)
    # Only the router LoRA's absence and no adapter the model has: nothing would train.
    no_experts = get_preset("qwen3_moe_tiny")
    with pytest.raises(ValueError, match="nothing of the qwen3_moe model would train"):
        lora_parameter_table([i for i in table if "linear_qkv" not in i.name], no_experts,
                             LoraSpec(rank=4, targets=("attention_qkv",), router="frozen"))


def test_memory_bytes_per_parameter():
    """Weights 2 bytes for everything held, gradients 4 and optimizer 12 for the trained part
    only (sharded over DP, per-expert adapters over expert DP)."""
    arch, table = base_table()
    spec = LoraSpec(rank=8, expert_adapters="per_expert", router="full")
    lora_table = lora_parameter_table(table, arch, spec)
    layout = Layout(tp=2, pp=2, ep=2, dp=4)
    plan = plan_layout(lora_table, arch, layout, TrainingShape(), 80, spec)
    dense, expert = by_hand(8, tp=2, ep=2)
    for stage, counts in zip(plan.stages,
                             stage_parameters(lora_table, arch, tp=2, ep=2, pp=2)):
        assert stage.trainable_params == 2 * (dense + expert)
        assert stage.weights == 2 * counts.total
        assert stage.gradients == 4 * 2 * (dense + expert)
        assert stage.optimizer == pytest.approx(12 * (2 * dense / 4 + 2 * expert / 2))
    replicated = plan_layout(lora_table, arch, layout,
                             TrainingShape(distributed_optimizer=False), 80, spec)
    assert replicated.stages[0].optimizer == 12 * 2 * (dense + expert)
    # The adapters' outputs add 2·r bytes per adapted linear a token passes (2 attention
    # linears, top-2 × 2 expert linears) in each of the stage's layers.
    full = plan_layout(table, arch, layout, TrainingShape(), 80)
    tokens = TrainingShape().seq_length * TrainingShape().micro_batch_size
    extra = plan.stages[0].activations - full.stages[0].activations
    in_flight = plan.stages[0].micro_batches_in_flight
    assert extra == pytest.approx(tokens * in_flight * 2 * (2 * 8 * (2 + 2 * 2)))


def test_lora_fits_where_full_fine_tuning_does_not():
    """Qwen3-30B-A3B on two 80 GB GPUs: full fine-tuning fits no layout, LoRA r=16 with the
    router trained fits at EP=2 (frozen bf16 weights 2 bytes a parameter instead of 18)."""
    arch, table = base_table("qwen3_moe")
    spec = LoraSpec(rank=16)
    full = plan_layouts(table, arch, 2, 80, TrainingShape())
    lora = plan_layouts(lora_parameter_table(table, arch, spec), arch, 2, 80, TrainingShape(),
                        spec)
    assert not any(p.fits for p in full)
    assert {p.layout for p in lora if p.fits} >= {Layout(tp=1, pp=1, ep=2, dp=2)}


def test_refusals():
    arch, table = base_table()
    with pytest.raises(ValueError, match="no shared experts"):
        lora_parameter_table(table, arch, LoraSpec(rank=4, targets=("shared_experts",)))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraSpec(rank=4, targets=("mlp",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSpec(rank=0)


def _tool():
    module = importlib.import_module("sara_megatron.cli.plan_layout")
    return module


def test_tool_lora_json(capsys):
    tool = _tool()
    assert tool.main(["--preset", "qwen3_moe_tiny", "--gpus", "8", "--gpu-memory", "80",
                      "--layout", "2,2,2", "--lora-rank", "8", "--expert-adapters", "shared",
                      "--router", "lora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    dense, expert = by_hand(8, tp=2, ep=2, expert_adapters="shared", router="lora")
    [row] = out["layouts"]
    assert [s["trainable_params"] for s in row["stages"]] == [2 * (dense + expert)] * 2
    assert out["lora"] == {"rank": 8, "targets": list(ALL), "expert_adapters": "shared",
                           "router": "lora"}
    assert out["trainable_params"] == L * sum(by_hand(8, expert_adapters="shared",
                                                      router="lora"))


def test_tool_smallest(capsys):
    """--smallest picks the least GPUs with a fitting layout: a memory between the one-GPU peak
    and the best two-GPU peak makes that two."""
    arch, table = base_table()
    spec = LoraSpec(rank=8)
    lora_table = lora_parameter_table(table, arch, spec)
    shape = TrainingShape(reserve_gb=0)
    [one] = plan_layouts(lora_table, arch, 1, 1, shape, spec)
    two = min(p.peak.total for p in plan_layouts(lora_table, arch, 2, 1, shape, spec))
    assert two < one.peak.total
    memory = (one.peak.total + two) / 2 / 1e9
    assert _tool().main(["--preset", "qwen3_moe_tiny", "--gpus", "8", "--gpu-memory",
                         repr(memory), "--reserve", "0", "--lora-rank", "8", "--smallest",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 2 and any(row["fits"] for row in out["layouts"])


@pytest.mark.parametrize("argv,message", [
    (["--router", "frozen"], "--router needs --lora-rank"),
    (["--lora-targets", "attention_qkv"], "--lora-targets needs --lora-rank"),
    (["--lora-rank", "8", "--lora-targets", "attention,experts_fc1"], "unknown LoRA target"),
    (["--lora-rank", "0"], "rank must be >= 1"),
])
def test_tool_lora_user_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        _tool().main(["--preset", "qwen3_moe_tiny", "--gpus", "2", "--gpu-memory", "80", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "plan_layout.py: error:" in err and message in err


def test_tool_target_the_model_lacks(capsys):
    assert _tool().main(["--preset", "qwen3_moe_tiny", "--gpus", "2", "--gpu-memory", "80",
                         "--lora-rank", "8", "--lora-targets", "shared_experts"]) == 2
    assert "no shared experts" in capsys.readouterr().err
