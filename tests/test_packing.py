"""Sequence packing's data side: the rule (whole samples, first-fit decreasing within each global
batch, round-robin rows over micro-batches, no micro-batch without a real token), the row layout
against the padded packing of each sample alone, and the packed loader: the same samples per step
as the padded loader at any data-parallel size, each sample with its own prior, resumable."""

import numpy as np
import pytest
import torch

from sara_megatron.data.batch import pack_tokens
from sara_megatron.data.packing import (
    fill_rate,
    first_fit_decreasing,
    pack_rows_tokens,
    plan_packed_step,
)
from sara_megatron.priors.loader import build_sara_data_loader

from test_dataset import config, data, prior_of  # noqa: F401 - `data` is a module fixture


def test_first_fit_decreasing_keeps_samples_whole():
    lengths = [30, 70, 10, 50, 64, 100, 5, 40]
    rows = first_fit_decreasing(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert all(row == sorted(row) for row in rows)  # stream order within a row
    # 369 tokens need at least 4 rows of 100; FFD finds 4 here, the padded run uses 8.
    assert len(rows) == 4
    assert fill_rate(lengths, len(rows), 100) == pytest.approx(369 / 400)
    assert first_fit_decreasing(lengths, 100) == rows  # deterministic
    # A sample longer than a row is cut to it and fills a row alone.
    assert first_fit_decreasing([150, 20], 100) == [[0], [1]]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_plan_uses_every_sample_once_and_no_micro_batch_is_empty(dp):
    rng = np.random.default_rng(0)
    for mbs in (1, 2, 3):
        lengths = rng.integers(5, 90, size=12 * mbs).tolist()
        plan = plan_packed_step(lengths, 128, mbs, dp)
        k = len(plan.micro_batches)
        assert k % dp == 0 and plan.micro_batches_per_rank == k // dp
        assert all(len(mb) == mbs and any(r >= 0 for r in mb) for mb in plan.micro_batches)
        seen = [s for rank in range(dp) for mb in plan.rank_micro_batches(rank)
                for r in mb if r >= 0 for s in plan.rows[r]]
        assert sorted(seen) == list(range(len(lengths)))


def test_few_rows_are_spread_over_the_micro_batches():
    # 4 short samples fit one row, but dp=2 × 2 micro-batches each need a real row.
    plan = plan_packed_step([3, 4, 5, 6], 100, 1, 4)
    assert len(plan.rows) == 4 and all(len(row) == 1 for row in plan.rows)
    plan = plan_packed_step([3, 4, 5, 6], 100, 1, 2)
    assert [len(row) for row in plan.rows] == [3, 1]
    with pytest.raises(ValueError, match="cannot give each"):
        plan_packed_step([3], 100, 1, 2)


def test_rows_match_each_sample_packed_alone():
    rng = np.random.default_rng(1)
    samples = [rng.integers(1, 50, size=n) for n in (7, 12, 3, 20)]
    prompts = [2, 5, 1, 20]  # the last has no response token
    rows = [[samples[0], samples[1]], [samples[2], samples[3]]]
    packed = pack_rows_tokens(rows, [prompts[:2], prompts[2:]], seq_length=24, pad_id=0)
    segment = 0
    for r, row in enumerate(rows):
        offset = 0
        for seq in row:
            n = len(seq)
            alone = pack_tokens([seq], [prompts[segment]], seq_length=n)
            span = slice(offset, offset + n)
            assert torch.equal(packed.tokens[r, span], alone.tokens[0])
            assert torch.equal(packed.labels[r, span], alone.labels[0])
            assert torch.equal(packed.loss_mask[r, span], alone.loss_mask[0])
            assert torch.equal(packed.position_ids[r, span], torch.arange(n))
            assert (packed.segment_ids[r, span] == segment).all()
            offset += n
            segment += 1
        assert packed.padding_mask[r, offset:].all() and not packed.padding_mask[r, :offset].any()
        assert (packed.segment_ids[r, offset:] == -1).all()
        assert (packed.loss_mask[r, offset:] == 0).all()
    with pytest.raises(ValueError, match="more than seq_length"):
        pack_rows_tokens([[samples[3], samples[1]]], [[1, 1]], seq_length=24)


def _step_samples(cfg, dp_size, global_batch, consumed=0, **kwargs):
    """{step: sorted sample ids} over every rank, with each batch's checks."""
    steps = {}
    for rank in range(dp_size):
        loader = build_sara_data_loader(cfg, rank, dp_size, consumed, global_batch_size=global_batch,
                                        **kwargs)
        step, left = 0, None
        for batch in loader:
            batch = batch.with_priors(loader.prior_table)
            if left is None:
                left = batch.step_micro_batches
            # per sample: its own prior, its own tokens' segment
            assert batch.priors.shape[1] == len(batch.sample_ids)
            for j, sid in enumerate(batch.sample_ids):
                assert torch.equal(batch.priors[:, j], torch.from_numpy(prior_of(sid)[[1, 3]]))
                assert (batch.segment_ids == j).any()
            assert batch.tokens.shape == (cfg.micro_batch_size, 64)
            steps.setdefault(step, []).extend(batch.sample_ids)
            left -= 1
            if left == 0:
                step, left = step + 1, None
    return {k: sorted(v) for k, v in steps.items()}


def test_loader_steps_take_the_padded_runs_samples(data):  # noqa: F811
    cfg = config(data, micro_batch_size=1, packing=True)
    padded_cfg = config(data, micro_batch_size=1)
    global_batch = 6
    padded = {}
    for i, batch in enumerate(build_sara_data_loader(padded_cfg, 0, 1)):
        padded.setdefault(i // global_batch, []).extend(batch.sample_ids)
    padded = {k: sorted(v) for k, v in padded.items() if len(v) == global_batch}
    one = _step_samples(cfg, 1, global_batch)
    two = _step_samples(cfg, 2, global_batch)
    assert one == two == padded
    # resumed after one step: the rest of the same stream
    resumed = _step_samples(cfg, 2, global_batch, consumed=global_batch)
    assert resumed == {k - 1: v for k, v in one.items() if k >= 1}
    with pytest.raises(ValueError, match="multiple of the global batch"):
        build_sara_data_loader(cfg, 0, 1, 3, global_batch_size=global_batch)
