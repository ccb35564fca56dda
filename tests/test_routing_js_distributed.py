"""Two gloo ranks each holding half of every sequence give the one-rank loss and gradients.

The ranks run in a process of their own (tests/routing_js_distributed_worker.py) with
TRITON_INTERPRET=1, so that the Triton kernels run in the interpreter next to the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import routing_js_distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("routing_js_distributed")
    # One thread per rank: two ranks share a small CPU box.
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, str(HERE / "routing_js_distributed_worker.py"), "--out", str(out_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return [
        torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(worker.WORLD_SIZE)
    ]


@pytest.mark.parametrize("impl", worker.IMPLEMENTATIONS)
def test_every_rank_gets_the_single_rank_js_and_counts(rank_results, impl):
    single = rank_results[0]
    for rank, results in enumerate(rank_results):
        torch.testing.assert_close(
            results[f"{impl}_js"], single[f"single_{impl}_js"], rtol=1e-6, atol=1e-7,
            msg=lambda m: f"rank {rank}: {m}",
        )
        assert results[f"{impl}_counts"].tolist() == list(worker.SEQUENCE_LENGTHS)
    # The globally empty sequence gets 0 on every rank; the one rank 1 holds no token of does not.
    assert (single[f"single_{impl}_js"][:, 2] == 0).all()
    assert (rank_results[1][f"{impl}_js"][:, 1] > 0).all()


@pytest.mark.parametrize("impl", worker.IMPLEMENTATIONS)
def test_each_rank_tokens_get_the_single_rank_gradient(rank_results, impl):
    single_grad = rank_results[0][f"single_{impl}_grad"]
    for rank, results in enumerate(rank_results):
        expected = single_grad[:, worker.local_token_slice(rank)]
        torch.testing.assert_close(
            results[f"{impl}_grad"], expected, rtol=1e-5, atol=1e-8,
            msg=lambda m: f"rank {rank}: {m}",
        )
    assert single_grad.abs().sum() > 0


def test_kernel_and_reference_agree_across_ranks(rank_results):
    for results in rank_results:
        torch.testing.assert_close(results["triton_js"], results["reference_js"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            results["triton_grad"], results["reference_grad"], rtol=1e-4, atol=1e-8
        )
