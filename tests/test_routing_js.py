"""`sequence_routing_js`: the reference against float64 finite differences and an independent
per-sequence computation, the gradient formulas of docs/kernel.md, input checks, and the Triton
kernels against the reference (in Triton's interpreter, in a process of its own: triton chooses its
interpreter when it is first imported, see kernels/routing_js_triton.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference
from sara_megatron.kernels.routing_js import resolve_implementation
from sara_megatron.kernels.routing_js_reference import js_divergence_from_mean

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launch  # noqa: E402
import routing_js_cases  # noqa: E402


def _small_problem(dtype=torch.float64, seed=0):
    """2 layers, 11 tokens in [S, B] order with padding, B = 3 with sequence 2 empty, priors with
    exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(2, 11, 5, generator=generator, dtype=torch.float64)
    segment_ids = torch.tensor([0, 1, -1, 0, 1, -1, 0, -1, -1, 0, -1])
    prior = torch.softmax(torch.randn(2, 3, 5, generator=generator, dtype=torch.float64), -1)
    prior[0, 0, 1] = 0.0
    prior[1, :, 3] = 0.0
    prior = prior / prior.sum(-1, keepdim=True)
    upstream = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    return logits.to(dtype), segment_ids, prior.to(dtype), upstream.to(dtype)


def _naive_js(logits, segment_ids, prior):
    """Per layer and sequence with Python loops over tokens and experts, float64, 0·log0 = 0."""
    num_layers, _, num_experts = logits.shape
    num_sequences = prior.shape[1]
    js = torch.zeros(num_layers, num_sequences, dtype=torch.float64)
    for layer in range(num_layers):
        for sequence in range(num_sequences):
            tokens = [t for t, s in enumerate(segment_ids.tolist()) if s == sequence]
            if not tokens:
                continue
            mean = sum(torch.softmax(logits[layer, t].double(), -1) for t in tokens) / len(tokens)
            total = 0.0
            for expert in range(num_experts):
                p, q = float(prior[layer, sequence, expert]), float(mean[expert])
                m = 0.5 * (p + q)
                if p > 0:
                    total += 0.5 * p * torch.log(torch.tensor(p / m, dtype=torch.float64)).item()
                if q > 0:
                    total += 0.5 * q * torch.log(torch.tensor(q / m, dtype=torch.float64)).item()
            js[layer, sequence] = total
    return js


def test_reference_matches_finite_differences():
    logits, segment_ids, prior, upstream = _small_problem()
    logits.requires_grad_(True)

    def weighted_js(x):
        return (sequence_routing_js_reference(x, segment_ids, prior) * upstream).sum()

    assert torch.autograd.gradcheck(weighted_js, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_reference_single_layer_form_matches_finite_differences():
    logits, segment_ids, prior, upstream = _small_problem()
    single_logits = logits[1].clone().requires_grad_(True)

    def weighted_js(x):
        return (sequence_routing_js_reference(x, segment_ids, prior[1]) * upstream[1]).sum()

    assert torch.autograd.gradcheck(weighted_js, (single_logits,), eps=1e-6, atol=1e-8, rtol=1e-6)
    js = sequence_routing_js_reference(logits, segment_ids, prior)
    torch.testing.assert_close(sequence_routing_js_reference(logits[1], segment_ids, prior[1]), js[1])


def test_reference_matches_independent_per_sequence_loop():
    logits, segment_ids, prior, _ = _small_problem(dtype=torch.float32, seed=3)
    js, counts = sequence_routing_js_reference(logits, segment_ids, prior, return_counts=True)
    assert js.dtype == torch.float32 and js.shape == (2, 3)
    torch.testing.assert_close(js.double(), _naive_js(logits, segment_ids, prior), rtol=1e-6, atol=1e-9)
    assert counts.tolist() == [4, 2, 0]
    assert (js[:, 2] == 0).all()


def test_js_gradient_with_respect_to_mean_is_half_log_ratio():
    generator = torch.Generator().manual_seed(7)
    prior = torch.softmax(torch.randn(4, 9, generator=generator, dtype=torch.float64), -1)
    prior[:, :3] = 0.0
    prior = prior / prior.sum(-1, keepdim=True)
    mean = torch.softmax(torch.randn(4, 9, generator=generator, dtype=torch.float64), -1)
    mean.requires_grad_(True)
    js = js_divergence_from_mean(prior, mean, torch.ones(4))
    (grad,) = torch.autograd.grad(js.sum(), mean)
    midpoint = 0.5 * (prior + mean.detach())
    torch.testing.assert_close(grad, 0.5 * torch.log(mean.detach() / midpoint), rtol=1e-12, atol=1e-14)


def test_token_gradient_is_softmax_projection_of_mean_gradient():
    """∂L/∂logits_t = R(t) ⊙ (g − ⟨g, R(t)⟩) / C_b with g = ∂L/∂Q̄_b (docs/kernel.md, "Gradient")."""
    logits, segment_ids, prior, upstream = _small_problem()
    logits.requires_grad_(True)
    js, counts = sequence_routing_js_reference(logits, segment_ids, prior, return_counts=True)
    (grad,) = torch.autograd.grad((js * upstream).sum(), logits)

    probs = torch.softmax(logits.detach(), -1)
    expected = torch.zeros_like(grad)
    for t, sequence in enumerate(segment_ids.tolist()):
        if sequence < 0:
            continue
        tokens = (segment_ids == sequence).nonzero().flatten()
        mean = probs[:, tokens].mean(1)  # [L, N]
        g = upstream[:, sequence, None] * 0.5 * torch.log(mean / (0.5 * (prior[:, sequence] + mean)))
        r = probs[:, t]
        expected[:, t] = r * (g - (g * r).sum(-1, keepdim=True)) / counts[sequence]
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13)
    assert (grad[:, segment_ids < 0] == 0).all()


def test_reference_is_finite_for_extreme_logits_and_zero_priors():
    logits, segment_ids, prior, upstream = _small_problem(dtype=torch.float32)
    logits = (torch.sign(logits) * 1e4).requires_grad_(True)
    prior = torch.zeros_like(prior)
    prior[..., 0] = 1.0  # one-hot priors: every other entry is an exact zero
    js = sequence_routing_js_reference(logits, segment_ids, prior)
    (grad,) = torch.autograd.grad((js * upstream).sum(), logits)
    assert torch.isfinite(js).all() and torch.isfinite(grad).all()
    assert (js >= 0).all() and (js <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_all_padding_gives_zero_js_zero_counts_zero_grad():
    logits, _, prior, _ = _small_problem(dtype=torch.float32)
    logits.requires_grad_(True)
    segment_ids = torch.full((11,), -1)
    result = sequence_routing_js(logits, segment_ids, prior, return_counts=True)
    assert (result.js == 0).all() and (result.token_counts == 0).all()
    (grad,) = torch.autograd.grad(result.js.sum(), logits)
    assert (grad == 0).all()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, s, p: (x[0, 0], s, p), ValueError, r"logits must be \[T, N\] or \[L, T, N\]"),
        (lambda x, s, p: (x, s, p[0]), ValueError, r"prior must be \[L, B, N\]"),
        (lambda x, s, p: (x.long(), s, p), TypeError, "logits must be float32"),
        (lambda x, s, p: (x, s.float(), p), TypeError, "segment_ids must be int32 or int64"),
        (lambda x, s, p: (x, s[:-1], p), ValueError, r"segment_ids must be \[T\] = \[11\]"),
        (lambda x, s, p: (x, s, p[..., :4]), ValueError, "prior has 4 experts, logits have 5"),
        (lambda x, s, p: (x, s, p[:1]), ValueError, "prior has 1 layers, logits have 2"),
        (lambda x, s, p: (x, s, p.long()), TypeError, "prior must be a floating-point"),
        (lambda x, s, p: (x, s.clone().fill_(3), p), ValueError, r"must lie in \[-1, 3\)"),
        (lambda x, s, p: (x, s.clone().fill_(-2), p), ValueError, r"must lie in \[-1, 3\)"),
        (lambda x, s, p: (x, s, p.clone().requires_grad_(True)), ValueError, "receives no gradient"),
    ],
)
@pytest.mark.parametrize("function", [sequence_routing_js, sequence_routing_js_reference])
def test_bad_inputs_raise_clear_errors(function, change, error, match):
    logits, segment_ids, prior, _ = _small_problem(dtype=torch.float32)
    with pytest.raises(error, match=match):
        function(*change(logits, segment_ids, prior))


def test_unvalidated_out_of_range_ids_are_ignored():
    logits, segment_ids, prior, _ = _small_problem(dtype=torch.float32)
    out_of_range = torch.where(segment_ids < 0, 7, segment_ids)
    torch.testing.assert_close(
        sequence_routing_js(logits, out_of_range, prior, validate=False),
        sequence_routing_js(logits, segment_ids, prior),
    )


def test_implementation_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_implementation("auto", cuda) == "triton"
    assert resolve_implementation("reference", cuda) == "reference"
    assert resolve_implementation("triton", cpu) == "triton"
    expected_on_cpu = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    assert resolve_implementation("auto", cpu) == expected_on_cpu
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_implementation("cuda", cpu)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="with TRITON_INTERPRET=1 the kernels do run on CPU tensors",
)
def test_kernels_on_cpu_without_interpreter_raise_clear_error():
    logits, segment_ids, prior, _ = _small_problem(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sequence_routing_js(logits, segment_ids, prior, impl="triton")


# --- the Triton kernels, in the interpreter ---------------------------------------------------


@launch.early_launch("interpreter_results")
def interpreter_command(folder):
    """The cases in Triton's interpreter (about 30 s on one core) start with the session."""
    return {"cmd": [sys.executable, HERE / "routing_js_cases.py", "--json",
                    folder / "results.json"],
            "cwd": HERE.parent, "timeout": 600, "env": {"TRITON_INTERPRET": "1"}}


@pytest.fixture(scope="module")
def interpreter_results(early_launches):
    background = early_launches["interpreter_results"]
    completed = background.wait()
    out = background.folder / "results.json"
    # A case out of tolerance makes the script exit 1; the per-case tests below say which.
    assert out.exists(), completed.stdout + completed.stderr
    payload = json.loads(out.read_text())
    payload["cases"] = {result["name"]: result for result in payload["cases"]}
    return payload


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", routing_js_cases.CASES, ids=lambda case: case.name)
def test_kernel_matches_reference(interpreter_results, case):
    result = interpreter_results["cases"][case.name]
    assert result["all_finite"]
    assert result["js_dtype"] == "torch.float32"
    assert result["grad_dtype"] == f"torch.{case.dtype}"
    expected_shape = [case.sequences] if case.single_layer else [case.layers, case.sequences]
    assert result["js_shape"] == expected_shape
    assert result["js_rel_error"] <= case.js_rtol, result
    assert result["grad_within_tolerance"], result
    assert result["counts_match"] and result["counts"] == result["expected_counts"]
    assert result["empty_js_all_zero"]
    assert result["padding_grad_all_zero"]
    if case.layout != "all_padding":
        assert result["empty_sequences"] >= 1  # every layout leaves one sequence without tokens


@pytest.mark.multiprocess
def test_split_chunk_paths_share_the_chunks_between_two_launches(interpreter_results):
    report = interpreter_results["split_chunk_paths"]
    assert report["launches"] == [1, 2]
    periodic, other = report["periodic_counts"], report["other_counts"]
    # Each launch sums some of the tokens, and together exactly those of the single launch.
    assert sum(periodic) > 0 and sum(other) > 0
    assert [p + o for p, o in zip(periodic, other)] == report["one_launch_counts"]
    assert report["parts_vs_split"] <= 1e-6
    assert report["split_vs_one_launch"] <= 1e-6


@pytest.mark.multiprocess
def test_finalize_keeps_its_digits_near_the_mean_and_stays_finite_when_lopsided(
    interpreter_results,
):
    report = interpreter_results["finalize"]
    for spread in ("0.001", "0.01", "0.1"):
        assert report[f"js_rel_error_{spread}"] <= 1e-6, report
        assert report[f"grad_factor_rel_error_{spread}"] <= 1e-6, report
    assert report["lopsided_finite"]
    assert report["lopsided_js_rel_error"] <= 1e-6, report


@pytest.mark.multiprocess
def test_kernel_contract_edges(interpreter_results):
    report = interpreter_results["contract"]
    # Unvalidated ids beyond int32 are ignored like any other out-of-range id, not wrapped.
    assert report["wide_ids_js_rel_error"] <= 1e-5
    assert report["wide_ids_counts"] == report["wide_ids_expected_counts"]
    # Without layers the counts still say which sequences have tokens.
    assert report["no_layers_js_shape"] == [0, 5]
    assert report["no_layers_counts"] == report["expected_counts"]
    assert "not twice differentiable" in report["double_backward"]


@pytest.mark.multiprocess
def test_kernel_keeps_only_logits_and_small_statistics_for_backward(interpreter_results):
    report = interpreter_results["saved_tensors"]
    small = report["layers_sequences_experts"]
    saved = report["triton"]
    assert any(entry["is_logits"] for entry in saved)
    for entry in saved:
        if entry["is_logits"]:
            continue
        assert entry["numel"] <= max(small, report["tokens"]), entry
    assert sum(entry["numel"] for entry in saved if not entry["is_logits"]) <= 2 * small + report["tokens"]
    # The reference, by contrast, keeps fp32 probabilities of the logits' size: the hook sees it.
    assert any(
        entry["numel"] == report["logits_numel"] and entry["dtype"] == "torch.float32"
        and not entry["is_logits"]
        for entry in report["reference"]
    )
