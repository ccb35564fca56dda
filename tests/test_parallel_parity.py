"""EP=2, TP=2 with sequence parallel, PP=2 and context parallel (alone, with EP, with TP) on gloo
give the single-rank loss and routing.

Every case of one world size runs in one torchrun launch (tests/workers/parallel_parity.py loops
over them; the processes start once and each preset's reference is built once); each test reads
its case's result."""

import json

import pytest

pytestmark = pytest.mark.stack

LAYOUTS = {
    "ep2": {"ep": 2},
    "tp2_sp": {"tp": 2},
    "pp2": {"pp": 2},
    "cp2": {"cp": 2},
    "cp2_ep2": {"cp": 2, "ep": 2},
    "tp2_sp_cp2": {"tp": 2, "cp": 2},
}
NPROC = {"tp2_sp_cp2": 4}
PRESETS = ["qwen3_moe_tiny", "phi35_moe_tiny"]
OBJECTIVE_PRESET = "qwen3_moe_tiny"
# Four processes on a CI machine's two cores are the suite's costliest launch: it runs one preset
# (PhiMoE's own parts, its router and longrope, are checked at every two-rank layout).
WIDE_PRESETS = [OBJECTIVE_PRESET]
LAYOUT_CASES = [(preset, layout) for preset in PRESETS for layout in LAYOUTS
                if NPROC.get(layout, 2) == 2 or preset in WIDE_PRESETS]
OBJECTIVE_LAYOUTS = ["ep2", "pp2", "tp2_sp"]
OBJECTIVES = ["aes", "kl", "js_entropy_normalised", "shifcon", "online"]
# LoRA adapters (per expert with a router adapter; shared per layer with the router trained).
LORA = ["lora", "lora_shared"]
# The layouts that split a micro-batch's tokens over ranks (sequence and context parallel), where
# megatron-core versions scale the load-balancing gradient differently (docs/compatibility.md).
LOAD_BALANCING_LAYOUTS = ["tp2_sp", "cp2", "tp2_sp_cp2"]
LOAD_BALANCING = ["load_balancing", "load_balancing_unmasked"]


def _cases(nproc: int) -> list[dict]:
    """The cases of one launch: every preset at every layout of that world size; at the objective
    layouts the objectives run too (after the loss and routing, which they leave as they are)."""
    def objectives(preset, layout):
        if preset != OBJECTIVE_PRESET:
            return []
        return ((OBJECTIVES + LORA if layout in OBJECTIVE_LAYOUTS else [])
                + (LOAD_BALANCING if layout in LOAD_BALANCING_LAYOUTS else []))

    return [{"name": f"{preset}-{layout}", "preset": preset, **parallel,
             "objectives": objectives(preset, layout)}
            for preset, layout in LAYOUT_CASES for parallel in (LAYOUTS[layout],)
            if NPROC.get(layout, 2) == nproc]


@pytest.fixture(scope="module")
def layout_result(torchrun_cases):
    def get(preset: str, layout: str) -> dict:
        nproc = NPROC.get(layout, 2)
        launch = torchrun_cases("tests/workers/parallel_parity.py", "--cases",
                                json.dumps(_cases(nproc)), nproc=nproc, timeout=900)
        return launch.result(f"{preset}-{layout}")

    return get


@pytest.mark.parametrize(("preset", "layout"), LAYOUT_CASES)
def test_layout_matches_single_rank(layout_result, preset, layout):
    result = layout_result(preset, layout)
    rel = abs(result["loss"] - result["ref_loss"]) / abs(result["ref_loss"])
    assert rel <= 1e-5, (result["loss"], result["ref_loss"])

    # Every layer reported exactly once per stage (PP: each stage its own global indices).
    ref_layers = sorted(result["ref_routing"])
    assert sorted(result["routing"]) == ref_layers
    if layout == "pp2":
        n = len(ref_layers)
        assert result["layers_by_rank"] == [list(range(n // 2)), list(range(n // 2, n))]
    for layer in ref_layers:
        ref, got = result["ref_routing"][layer], result["routing"][layer]
        assert len(got) == len(ref)
        for ref_row, row in zip(ref, got):
            assert max(abs(a - b) for a, b in zip(ref_row, row)) <= 1e-5
            assert abs(sum(row) - 1.0) <= 1e-5


@pytest.mark.parametrize("layout", OBJECTIVE_LAYOUTS)
def test_objectives_match_single_rank(layout_result, layout):
    """The objectives (AES, ShifCon, the KL and entropy-normalised JS variants of SARA)
    under EP=2, PP=2 and TP=2 with sequence parallel: each term's value, its whole gradient's norm and every router's gradient
    equal the single-rank ones (AES's orthogonality term sums a token's expert outputs over EP
    ranks; ShifCon's symmetric term gathers its samples over data parallel at EP=2 and contrasts on
    both stages at PP=2); online
    priors taken through the layout's schedule equal the single-rank routing means."""
    full = layout_result(OBJECTIVE_PRESET, layout)
    assert sorted(full["online_priors"]) == sorted(full["ref_routing"])
    for layer, ref in full["ref_routing"].items():
        got = full["online_priors"][layer]
        assert len(got) == len(ref)
        for ref_row, row in zip(ref, got):
            assert max(abs(a - b) for a, b in zip(ref_row, row)) <= 1e-5, layer
    result = {name: sides for name, sides in full["objectives"].items()
              if name not in LOAD_BALANCING}
    assert sorted(result) == ["aes", "js_entropy_normalised", "kl", "shifcon"]
    for objective, sides in result.items():
        ref, got = sides["ref"], sides["layout"]
        assert ref["value"] != 0 and ref["grad_sq"] > 0, objective
        assert got["value"] == pytest.approx(ref["value"], rel=1e-5), objective
        assert got["grad_sq"] == pytest.approx(ref["grad_sq"], rel=1e-4), objective
        assert sorted(got["routers"]) == sorted(ref["routers"]), objective
        for layer, want in ref["routers"].items():
            scale = max(abs(v) for v in want)
            # ShifCon's terms sit at the inputs of layers 1 and 2: the routers of layers 2 and 3
            # get nothing from them.
            assert scale > 0 or (objective == "shifcon" and layer in ("2", "3")), (
                objective, layer)
            assert max(abs(a - b) for a, b in zip(got["routers"][layer], want)) <= 1e-4 * scale, (
                objective, layer)


@pytest.mark.parametrize("term", LOAD_BALANCING)
@pytest.mark.parametrize("layout", LOAD_BALANCING_LAYOUTS)
def test_load_balancing_gradient_matches_single_rank(layout_result, layout, term):
    """megatron's load-balancing loss under per-token loss, with a padding mask whose padding
    falls unevenly on the ranks that split the sequences, and without one: its value and every
    router's gradient equal one rank's on the installed megatron-core. (Alone, 0.16.1-0.18 give
    1/(TP·CP) of the gradient without a padding mask, and 0.19 gives TP·CP times it with one;
    ObservedTopKRouter corrects either.)"""
    sides = layout_result(OBJECTIVE_PRESET, layout)["objectives"][term]
    ref, got = sides["ref"], sides["layout"]
    assert ref["value"] > 0 and ref["grad_sq"] > 0
    assert got["value"] == pytest.approx(ref["value"], rel=1e-5)
    assert got["grad_sq"] == pytest.approx(ref["grad_sq"], rel=1e-4)
    assert sorted(got["routers"]) == sorted(ref["routers"])
    for layer, want in ref["routers"].items():
        scale = max(abs(v) for v in want)
        assert scale > 0, layer
        assert max(abs(a - b) for a, b in zip(got["routers"][layer], want)) <= 1e-4 * scale, layer


@pytest.mark.parametrize("variant", LORA)
@pytest.mark.parametrize("layout", OBJECTIVE_LAYOUTS)
def test_lora_loss_and_adapter_gradients_match_single_rank(layout_result, layout, variant):
    """LoRA under EP=2, PP=2 and TP=2 with sequence parallel: the adapted model's loss and every
    adapter's gradient (column B and row A gathered from their TP shards, expert adapters from
    their EP ranks, shared ones and the trained routers reduced as training reduces them) equal
    the single-rank ones."""
    got = layout_result(OBJECTIVE_PRESET, layout)["lora"][variant]
    assert got["loss"] == pytest.approx(got["ref_loss"], rel=1e-5)
    assert got["names"] == got["ref_names"]
    assert any(n.endswith("router.weight") for n in got["names"]) == (variant == "lora_shared")
    for name, scale in got["ref_max"].items():
        assert scale > 0, name
        assert got["max_diff"][name] <= 1e-5 * scale + 1e-9, (name, got["max_diff"][name], scale)
