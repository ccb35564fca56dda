"""The layout planner (sara_megatron/planning, tools/plan_layout.py): per-rank parameter counts
and checkpoint regions derived from one meta-device build equal those of models built at TP=2,
EP=2 and PP=2; the paper's layout fits, one GPU does not; the converter's mapping covers the
full-size Qwen3-30B-A3B and Phi-3.5-MoE exactly once at the planned layouts (meta tensors)."""

import dataclasses
import importlib
import json

import pytest

from sara_megatron.conversion.errors import ConversionError
from sara_megatron.models.architecture import from_hf_config, get_preset
from sara_megatron.planning import conversion_check as cc
from sara_megatron.planning.memory import Layout, TrainingShape, plan_layouts
from sara_megatron.planning.parameters import (
    build_meta_model,
    parameter_table,
    stage_parameters,
    total_parameters,
)

LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}
CASES = [(preset, layout) for preset in ("qwen3_moe_tiny", "phi35_moe_tiny") for layout in LAYOUTS]

_models = {}


def meta_model(preset):
    if preset not in _models:
        arch = get_preset(preset)
        _models[preset] = (arch, build_meta_model(arch))
    return _models[preset]


@pytest.fixture(scope="module")
def built(torchrun_cases):
    return torchrun_cases("tests/workers/plan_layouts.py", timeout=300)


@pytest.mark.parametrize("preset,layout", CASES)
def test_counts_and_regions_equal_built_models(built, preset, layout):
    """Each rank's dense and expert parameters and its checkpoint regions, derived from the
    TP=EP=PP=1 meta build, equal those of the model megatron builds at the layout."""
    arch, model = meta_model(preset)
    sizes = {"tp": 1, "ep": 1, "pp": 1, **LAYOUTS[layout]}
    stages = stage_parameters(parameter_table(model), arch, **sizes)
    templates = cc.shard_templates(model)
    for rank in built.result(f"{preset}_{layout}")["ranks"]:
        stage = stages[rank["pp_rank"]]
        assert (stage.dense, stage.expert) == (rank["dense"], rank["expert"]), rank["pp_rank"]
        derived = cc.rank_regions(templates, arch, **sizes, tp_rank=rank["tp_rank"],
                                  ep_rank=rank["ep_rank"], pp_rank=rank["pp_rank"])
        got = sorted((r.key, tuple(r.index), tuple(map(tuple, r.box))) for r in derived)
        want = sorted((k, tuple(i), tuple(map(tuple, b))) for k, i, b in rank["regions"])
        assert got == want


def test_whole_model_counts():
    """The meta build's totals: Qwen3-30B-A3B's 30.5B parameters (vocabulary padded to 151936,
    a multiple of 128 already), its experts 48·128·3·2048·768."""
    arch, model = meta_model("qwen3_moe")
    table = parameter_table(model)
    assert total_parameters(table, arch) == 30_532_122_624
    assert sum(s.expert for s in stage_parameters(table, arch)) == 48 * 128 * 3 * 2048 * 768


def _paper_plan(**shape):
    arch, model = meta_model("qwen3_moe")
    table = parameter_table(model)
    return arch, table, plan_layouts(table, arch, 16, 80, TrainingShape(**shape))


def test_paper_layout_fits_and_one_gpu_does_not():
    """EP=8 × PP=2 on 16 × 80 GB (examples/qwen3_30b_a3b_sara.yaml, the sbatch recipe) fits at
    the paper's length (2048, micro-batch 1); the whole 30B model on one 80 GB GPU does not."""
    arch, table, plans = _paper_plan(seq_length=2048, micro_batch_size=1)
    by_layout = {p.layout: p for p in plans}
    paper = by_layout[Layout(tp=1, pp=2, ep=8, dp=8)]
    assert paper.fits
    # EP=8: 16 of 128 experts per rank; PP=2: 24 layers, one of the two vocabulary matrices.
    assert paper.peak.expert_params == 24 * 16 * 3 * 2048 * 768
    assert paper.peak.optimizer == pytest.approx(
        12 * (paper.peak.dense_params / 8 + paper.peak.expert_params / 1))
    assert not by_layout[Layout(tp=1, pp=1, ep=1, dp=16)].fits
    [alone] = plan_layouts(table, arch, 1, 80, TrainingShape())
    assert not alone.fits and alone.peak.total > 80e9
    # The replicated optimizer keeps 18 bytes a parameter: more memory than the distributed one.
    replicated = plan_layouts(table, arch, 16, 80, TrainingShape(distributed_optimizer=False))
    assert {p.layout: p for p in replicated}[paper.layout].peak.total > paper.peak.total


def test_activation_formula_scales():
    """Activations double with the sequence, fall with TP (sequence parallel), and full recompute
    keeps far less than none."""
    arch, table, _ = _paper_plan()
    layout = Layout(tp=1, pp=2, ep=8, dp=8)
    from sara_megatron.planning.memory import activation_bytes

    one, _ = activation_bytes(arch, layout, TrainingShape(seq_length=2048), stage=0)
    two, _ = activation_bytes(arch, layout, TrainingShape(seq_length=4096), stage=0)
    assert two == pytest.approx(2 * one)
    tp2, _ = activation_bytes(arch, Layout(tp=2, pp=2, ep=4, dp=4), TrainingShape(), stage=0)
    assert tp2 < one
    full, _ = activation_bytes(arch, layout, TrainingShape(recompute="full"), stage=0)
    assert full < one / 5


def _tool():
    module = importlib.import_module("sara_megatron.cli.plan_layout")
    return module


def test_tool_prints_the_paper_layout(capsys):
    tool = _tool()
    assert tool.main(["--preset", "qwen3_moe", "--gpus", "16", "--gpu-memory", "80",
                      "--layout", "1,2,8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [row] = out["layouts"]
    assert (row["tp"], row["pp"], row["ep"], row["dp"], row["fits"]) == (1, 2, 8, 8, True)


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "16", "--gpu-memory", "80", "--preset", "qwen9"], "unknown model preset"),
    (["--gpus", "0", "--gpu-memory", "80", "--preset", "qwen3_moe"], "--gpus must be >= 1"),
    (["--gpus", "16", "--gpu-memory", "80", "--preset", "qwen3_moe", "--layout", "3,2,8"],
     "TP·PP must divide"),
    (["--gpus", "16", "--gpu-memory", "80", "--preset", "qwen3_moe", "--recompute", "some"],
     "invalid choice"),
])
def test_tool_user_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        _tool().main(argv)
    assert exit_.value.code == 2
    assert "plan_layout.py: error:" in capsys.readouterr().err


def test_tool_layout_that_does_not_divide_the_model(capsys):
    """EP=8 with DP=4 passes argparse but not the model's rules: one line, exit 2."""
    assert _tool().main(["--preset", "qwen3_moe_tiny", "--gpus", "16", "--gpu-memory", "80",
                         "--layout", "2,2,8"]) == 2
    assert "plan_layout.py: error: TP=2 PP=2 EP=8 DP=4 is not a layout" in capsys.readouterr().err


@pytest.mark.parametrize("preset,layouts", [
    ("qwen3_moe", [(1, 8, 2)]),      # the paper's EP=8 × PP=2
    ("phi35_moe", [(1, 8, 2), (4, 4, 2)]),
])
def test_conversion_covers_full_size_models_at_planned_layouts(preset, layouts):
    """transformers' full-size model on the meta device, in the hub's per-expert key layout:
    every hub tensor is read by exactly one shard and every Megatron tensor is tiled exactly once
    over the layout's ranks, through the converter's own mapping."""
    arch, model = meta_model(preset)
    assert from_hf_config(cc.hf_config(arch).to_dict()) == arch  # the config is the preset
    shapes = cc.hf_checkpoint_shapes(arch)
    assert f"model.layers.0.{'mlp' if preset == 'qwen3_moe' else 'block_sparse_moe'}.experts.0." \
           f"{'gate_proj' if preset == 'qwen3_moe' else 'w1'}.weight" in shapes
    for tp, ep, pp in layouts:
        check = cc.check_conversion_at_layout(arch, model, tp=tp, ep=ep, pp=pp, hf_shapes=shapes)
        assert check.hf_tensors == len(shapes)


def test_conversion_check_catches_faults(monkeypatch):
    """A hub tensor of the wrong shape, a hub tensor left unread and a shard rule that drops a
    rank's rows are each refused."""
    arch, model = meta_model("qwen3_moe_tiny")
    shapes = cc.hf_checkpoint_shapes(arch)
    cc.check_conversion_at_layout(arch, model, tp=2, ep=2, pp=2, hf_shapes=shapes)
    wrong = dict(shapes, **{"model.layers.1.mlp.gate.weight": (9, arch.hidden_size)})
    with pytest.raises(ConversionError, match="shape mismatch"):
        cc.check_conversion_at_layout(arch, model, tp=2, hf_shapes=wrong)
    extra = dict(shapes, **{"model.layers.1.mlp.extra.weight": (4, 4)})
    with pytest.raises(ConversionError, match="unexpected tensors"):
        cc.check_conversion_at_layout(arch, model, tp=2, hf_shapes=extra)
    real = cc.rank_regions

    def lossy(*args, **kwargs):  # rank 1 of TP loses its share of the QKV weight
        return [r for r in real(*args, **kwargs)
                if not (kwargs["tp_rank"] == 1 and r.key.endswith("linear_qkv.weight"))]

    monkeypatch.setattr(cc, "rank_regions", lossy)
    with pytest.raises(ConversionError, match="linear_qkv.weight.*cover"):
        cc.check_conversion_at_layout(arch, model, tp=2, hf_shapes=shapes)
