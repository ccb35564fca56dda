"""Triton kernels for the sequence routing Jensen–Shannon divergence.

Three kernels, one pass over the logits in each direction:

forward  `_accumulate_kernel`  one program per (chunk of TILES_PER_PROGRAM × BLOCK_T tokens, layer):
         fp32 softmax of each [BLOCK_T, N] tile, summed per sequence in registers, then added to an
         fp32 [L, B, N] accumulator with one atomic row per sequence (token counts [B] likewise,
         from layer 0's programs). Tokens may come in any order; the chunk's ids pick the path:
           periodic ids (every tile repeats the first tile's ids: inside a packed sequence, or
             [S, B] flattening with B dividing BLOCK_T): tiles are added elementwise — no
             cross-thread work per tile, no id loads, and with NUM_STAGES > 1 each tile's load
             issued before the previous tile's softmax — and segment-reduced once per chunk;
           ids spanning at most SEGMENT_SLOTS values: each tile is segment-reduced into registers;
           otherwise tile by tile, SEGMENT_SLOTS ids at a time, or one atomic per token and expert
             when a tile's ids spread over more than MAX_SEGMENT_SPAN values.
         A segment reduction is a one-hot [slots, tokens] × [tokens, N] matmul on tensor cores in
         "tf32x3" (fp32-accurate: the one-hot is exact, the probabilities are split in two).
         Optionally (`LaunchConfig.split_chunk_paths`) two launches of it, the first compiled
         with the periodic path only (fewer registers), the second with the others.
         `_finalize_kernel`  one program per (layer, sequence): mean = sum / count, JS(prior ‖ mean)
         and the gradient factor ½·log(mean / midpoint) / count (O(L·B·N) work; the divergence is
         summed in a form without first-order cancellation, so near-equal distributions keep
         their digits in fp32, and no log of a rounded 1 − 1 makes it −inf).
backward `_backward_kernel`  recomputes the softmax of each tile from the logits and writes
         ∂L/∂logits_t = R(t) ⊙ (g − ⟨g, R(t)⟩) · ∂L/∂js[l, b] with g the saved gradient factor.

Both directions do a few operations per element loaded, so instruction issue, not only HBM, bounds
them: exponentials are one FMA and one `ex2.approx.ftz` (`_exp2`), and the softmax's 1 / row sum
is folded into the next multiply. Instruction counts per tile are in docs/kernel.md.

Nothing of size [L, T, N] is kept between forward and backward. With a process group the
accumulator is all-reduced between the two forward kernels.

On CPU tensors the kernels run in Triton's interpreter, which must be switched on with
TRITON_INTERPRET=1 before triton is first imported: `triton.jit` picks compiler or interpreter when a
function is decorated, and triton.language's own helpers (tl.max, tl.sum, ...) are decorated at
import, so wrapping only these kernels in an `InterpretedFunction` later does not work (triton 3.9).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.jit import JITFunction

# Sequences one program sums at once (one-hot rows of the segment-sum matmul).
SEGMENT_SLOTS = 16
# A tile whose valid ids span more consecutive values than this uses one atomic per token.
MAX_SEGMENT_SPAN = 64
# Forward: tiles one program walks at most, and the fewest programs a launch should keep (a few
# waves on an H100's 132 SMs).
_MAX_TILES_PER_PROGRAM = 16
_MIN_PROGRAMS = 512
# Elements of one [BLOCK_T, BLOCK_N] tile (32 resp. 16 fp32 values per thread at 4 warps).
_FORWARD_TILE_ELEMENTS = 32 * 128
_BACKWARD_TILE_ELEMENTS = 16 * 128
_LOG2E = tl.constexpr(1.4426950408889634)
_SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)
_LARGEST_LOG2E_MAX = tl.constexpr(2.0**29)  # see _softmax_parts


@triton.jit
def _exp2(x):
    """2**x. Compiled, libdevice's exp2f is one `ex2.approx.ftz` (Triton's default
    `enable_reflect_ftz`), where plain `tl.exp2` adds a range test and two multiplies to keep
    denormal results; those (below 2**-126) are under fp32's resolution next to a row sum of at
    least 1, so flushing them to 0 loses nothing. The interpreter runs no libdevice."""
    if _COMPILED:
        return libdevice.exp2(x)
    else:
        return tl.exp2(x)


# Whether triton.jit compiles these kernels (False under TRITON_INTERPRET=1), read by jit code.
_COMPILED = tl.constexpr(isinstance(_exp2, JITFunction))


@triton.jit
def _load_rows(
    logits_ptr, layer, tokens, experts, valid, num_experts, stride_logits_layer,
    stride_logits_token,
):
    """The rows `valid` of a [tokens, experts] tile of the logits, in their dtype; -inf elsewhere."""
    offsets = (
        layer.to(tl.int64) * stride_logits_layer
        + tokens.to(tl.int64)[:, None] * stride_logits_token
        + experts[None, :]
    )
    return tl.load(
        logits_ptr + offsets,
        mask=valid[:, None] & (experts < num_experts)[None, :],
        other=-float("inf"),
    )


@triton.jit
def _load_segment_ids(pointers, mask, num_sequences):
    """Segment ids as int32, -1 for padding and for any id outside [0, num_sequences) — decided
    before narrowing, so an unvalidated int64 id such as 2^32 is not read as sequence 0."""
    ids = tl.load(pointers, mask=mask, other=-1)
    return tl.where((ids >= 0) & (ids < num_sequences), ids.to(tl.int32), -1)


@triton.jit
def _softmax_parts(logits, valid):
    """exp(x − row max) in fp32 of the rows `valid` of loaded logits (-inf where not loaded), and
    1 / each row's sum (0 on the other rows): the softmax is their product, which callers fold
    into their next multiply."""
    logits = logits.to(tl.float32)
    row_max = tl.where(valid, tl.max(logits, axis=1), 0.0)
    # exp(x − max) as 2^(x·log2e − max·log2e): one FMA per element. The FMA's product is exact, so
    # the only rounding not shared by the whole row is the FMA's own, as for x − max; the rounding
    # of max·log2e is common to the row and cancels in the normalisation — while it stays small:
    # it shifts the largest term to 2^(±½ ulp(max·log2e)), which leaves exp2's range once
    # |max| ≳ 3e9. Rows with |max| ≥ 2^29 take 2^(x − max) instead (scale 1: exact product, the
    # largest term exactly 1): there distinct fp32 values lie ≥ 32 apart, so every other term is
    # below 2^-32 ≈ 2e-10 of the largest with either base, under fp32's resolution of the sum.
    scale = tl.where(tl.abs(row_max) < _LARGEST_LOG2E_MAX, _LOG2E, 1.0)
    exps = _exp2(tl.fma(logits, scale[:, None], -(row_max * scale)[:, None]))
    denominator = tl.sum(exps, axis=1)
    # A masked row has exps all 0 and denominator 0; its scale is 0, never 0/0.
    return exps, tl.where(valid, 1.0 / tl.where(valid, denominator, 1.0), 0.0)


@triton.jit
def _softmax_tile(
    logits_ptr, segment_ids_ptr, layer, tokens, experts, num_tokens, num_experts, num_sequences,
    stride_logits_layer, stride_logits_token,
):
    """`_softmax_parts` of a [tokens, experts] tile, the tokens' segment ids, and which are valid
    (padding rows come out all zero)."""
    segment = _load_segment_ids(segment_ids_ptr + tokens, tokens < num_tokens, num_sequences)
    valid = segment >= 0
    logits = _load_rows(
        logits_ptr, layer, tokens, experts, valid, num_experts, stride_logits_layer,
        stride_logits_token,
    )
    exps, inverse_sum = _softmax_parts(logits, valid)
    return exps, inverse_sum, segment, valid


@triton.jit
def _segment_sum(probs, slot_of_token, SEGMENT_SLOTS: tl.constexpr):
    """[SEGMENT_SLOTS, N] sums of the rows of `probs` per slot (-1 = no slot), and row counts.

    A one-hot [slots, tokens] matrix times the tile, on tensor cores: the one-hot is exact in tf32,
    and "tf32x3" splits the probabilities into two tf32 halves, so the sums keep fp32 accuracy.
    """
    slots = tl.arange(0, SEGMENT_SLOTS)
    one_hot = (slot_of_token[None, :] == slots[:, None]).to(tl.float32)
    partial = tl.dot(one_hot, probs, input_precision="tf32x3")
    return partial, tl.sum(one_hot, axis=1)


@triton.jit
def _add_window(sums_layer_ptr, counts_ptr, layer, first, window_sums, window_counts, experts,
                num_experts, SEGMENT_SLOTS: tl.constexpr):
    """Add the [SEGMENT_SLOTS, N] sums and token counts of sequences first, first + 1, ... to the
    accumulators, one atomic row per sequence with tokens (counts from layer 0's programs only)."""
    slots = tl.arange(0, SEGMENT_SLOTS)
    has_tokens = window_counts > 0
    tl.atomic_add(
        sums_layer_ptr + (first + slots)[:, None] * num_experts + experts[None, :],
        window_sums,
        mask=has_tokens[:, None] & (experts < num_experts)[None, :],
        sem="relaxed",
    )
    if layer == 0:
        tl.atomic_add(counts_ptr + first + slots, window_counts, mask=has_tokens, sem="relaxed")


@triton.jit
def _sum_periodic_chunk(
    logits_ptr, sums_layer_ptr, counts_ptr, layer, chunk_start, first_ids, lowest, highest,
    num_experts, num_sequences, stride_logits_layer, stride_logits_token, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr, SEGMENT_SLOTS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """A chunk whose tiles all repeat the first tile's ids: the tiles' probabilities are added
    elementwise (no cross-thread work per tile), then segment-reduced once."""
    experts = tl.arange(0, BLOCK_N)
    # Every tile's ids are the first tile's, so the valid rows are known without loading them:
    # each tile's logits load waits on nothing (and out-of-range tokens, whose id reads as -1,
    # can only sit in rows whose first id is invalid too).
    first_valid = (first_ids >= 0) & (first_ids < num_sequences)
    row_sums = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    tokens = chunk_start + tl.arange(0, BLOCK_T)
    if NUM_STAGES == 1:
        for tile in tl.range(0, TILES_PER_PROGRAM, num_stages=1):
            logits = _load_rows(
                logits_ptr, layer, tokens + tile * BLOCK_T, experts, first_valid, num_experts,
                stride_logits_layer, stride_logits_token,
            )
            exps, inverse_sum = _softmax_parts(logits, first_valid)
            row_sums += exps * inverse_sum[:, None]
    else:
        # Each tile's load is issued before the previous tile's softmax: a double buffer in
        # registers, cheaper than Triton's pipeliner (no shared-memory round trip, selects or
        # barriers). The pipeliner leaves this loop as it is, so 3 stages compile as 2.
        next_logits = _load_rows(
            logits_ptr, layer, tokens, experts, first_valid, num_experts, stride_logits_layer,
            stride_logits_token,
        )
        for tile in tl.range(0, TILES_PER_PROGRAM, num_stages=1):
            logits = next_logits
            next_logits = _load_rows(
                logits_ptr, layer, tokens + (tile + 1) * BLOCK_T, experts,
                first_valid & (tile + 1 < TILES_PER_PROGRAM), num_experts, stride_logits_layer,
                stride_logits_token,
            )
            exps, inverse_sum = _softmax_parts(logits, first_valid)
            row_sums += exps * inverse_sum[:, None]
    for base in range(lowest, highest + 1, SEGMENT_SLOTS):
        partial, partial_rows = _segment_sum(
            row_sums, tl.where(first_valid, first_ids - base, -1), SEGMENT_SLOTS
        )
        _add_window(sums_layer_ptr, counts_ptr, layer, base, partial,
                    partial_rows * TILES_PER_PROGRAM, experts, num_experts, SEGMENT_SLOTS)


@triton.jit
def _sum_other_chunk(
    logits_ptr, segment_ids_ptr, sums_layer_ptr, counts_ptr, layer, chunk_start, lowest,
    highest, num_tokens, num_experts, num_sequences, stride_logits_layer, stride_logits_token,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    SEGMENT_SLOTS: tl.constexpr, MAX_SEGMENT_SPAN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """A chunk with changing ids: segment-reduced tile by tile, into register sums when all its
    ids fit one window of SEGMENT_SLOTS sequences, else straight into the accumulators, window by
    window, or with one atomic per token and expert when a tile's ids spread too wide for that."""
    experts = tl.arange(0, BLOCK_N)
    if highest - lowest < SEGMENT_SLOTS:
        sums = tl.zeros([SEGMENT_SLOTS, BLOCK_N], dtype=tl.float32)
        counts = tl.zeros([SEGMENT_SLOTS], dtype=tl.float32)
        for tile in tl.range(0, TILES_PER_PROGRAM, num_stages=NUM_STAGES):
            tokens = chunk_start + tile * BLOCK_T + tl.arange(0, BLOCK_T)
            exps, inverse_sum, segment, valid = _softmax_tile(
                logits_ptr, segment_ids_ptr, layer, tokens, experts, num_tokens, num_experts,
                num_sequences, stride_logits_layer, stride_logits_token,
            )
            probs = exps * inverse_sum[:, None]
            partial, partial_counts = _segment_sum(
                probs, tl.where(valid, segment - lowest, -1), SEGMENT_SLOTS
            )
            sums += partial
            counts += partial_counts
        _add_window(sums_layer_ptr, counts_ptr, layer, lowest, sums, counts, experts, num_experts,
                    SEGMENT_SLOTS)
    else:
        for tile in range(0, TILES_PER_PROGRAM):
            tokens = chunk_start + tile * BLOCK_T + tl.arange(0, BLOCK_T)
            exps, inverse_sum, segment, valid = _softmax_tile(
                logits_ptr, segment_ids_ptr, layer, tokens, experts, num_tokens, num_experts,
                num_sequences, stride_logits_layer, stride_logits_token,
            )
            probs = exps * inverse_sum[:, None]
            tile_lowest = tl.min(tl.where(valid, segment, num_sequences), axis=0)
            tile_highest = tl.max(tl.where(valid, segment, -1), axis=0)
            if tile_highest >= 0:
                if tile_highest - tile_lowest < MAX_SEGMENT_SPAN:
                    for base in range(tile_lowest, tile_highest + 1, SEGMENT_SLOTS):
                        partial, partial_counts = _segment_sum(
                            probs, tl.where(valid, segment - base, -1), SEGMENT_SLOTS
                        )
                        _add_window(sums_layer_ptr, counts_ptr, layer, base, partial,
                                    partial_counts, experts, num_experts, SEGMENT_SLOTS)
                else:
                    tl.atomic_add(
                        sums_layer_ptr + segment[:, None] * num_experts + experts[None, :],
                        probs,
                        mask=valid[:, None] & (experts < num_experts)[None, :],
                        sem="relaxed",
                    )
                    if layer == 0:
                        tl.atomic_add(counts_ptr + segment, tl.full([BLOCK_T], 1.0, tl.float32),
                                      mask=valid, sem="relaxed")


@triton.jit
def _accumulate_kernel(
    logits_ptr,
    segment_ids_ptr,
    sums_ptr,  # [L, B, N] fp32, zeroed
    counts_ptr,  # [B] fp32, zeroed
    num_tokens,
    num_experts,
    num_sequences,
    stride_logits_layer,
    stride_logits_token,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    TILES_POW2: tl.constexpr,  # TILES_PER_PROGRAM rounded up to a power of two (tl.arange's)
    SEGMENT_SLOTS: tl.constexpr,
    MAX_SEGMENT_SPAN: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PERIODIC_CHUNKS: tl.constexpr,  # this launch sums the chunks with periodic ids
    OTHER_CHUNKS: tl.constexpr,  # this launch sums all other chunks
):
    chunk = tl.program_id(0)
    layer = tl.program_id(1)
    chunk_start = chunk * (BLOCK_T * TILES_PER_PROGRAM)
    sums_layer_ptr = sums_ptr + layer.to(tl.int64) * num_sequences * num_experts

    # The ids of the whole chunk decide the path. Periodic ids (every tile of the chunk repeats the
    # first tile's ids: a packed sequence, or [S, B] flattening with B dividing BLOCK_T) are the
    # usual case and the cheapest; compiled apart from the other paths they also need fewer
    # registers, hence PERIODIC_CHUNKS / OTHER_CHUNKS.
    tile_rows = tl.arange(0, BLOCK_T)
    tiles = tl.arange(0, TILES_POW2)
    tile_in_chunk = tiles < TILES_PER_PROGRAM
    chunk_tokens = chunk_start + tiles[:, None] * BLOCK_T + tile_rows[None, :]
    chunk_ids = _load_segment_ids(
        segment_ids_ptr + chunk_tokens,
        tile_in_chunk[:, None] & (chunk_tokens < num_tokens),
        num_sequences,
    )
    first_ids = _load_segment_ids(
        segment_ids_ptr + chunk_start + tile_rows, chunk_start + tile_rows < num_tokens,
        num_sequences,
    )
    repeats_first = (chunk_ids == first_ids[None, :]) | ~tile_in_chunk[:, None]
    periodic = tl.min(repeats_first.to(tl.int32))  # 1 or 0
    chunk_valid = chunk_ids >= 0
    lowest = tl.min(tl.min(tl.where(chunk_valid, chunk_ids, num_sequences), axis=1), axis=0)
    highest = tl.max(tl.max(tl.where(chunk_valid, chunk_ids, -1), axis=1), axis=0)
    if PERIODIC_CHUNKS:
        if (periodic == 1) & (highest >= 0):
            _sum_periodic_chunk(
                logits_ptr, sums_layer_ptr, counts_ptr, layer, chunk_start, first_ids, lowest,
                highest, num_experts, num_sequences, stride_logits_layer, stride_logits_token,
                BLOCK_T, BLOCK_N, TILES_PER_PROGRAM, SEGMENT_SLOTS, NUM_STAGES,
            )
    if OTHER_CHUNKS:
        if (periodic == 0) & (highest >= 0):
            _sum_other_chunk(
                logits_ptr, segment_ids_ptr, sums_layer_ptr, counts_ptr, layer, chunk_start,
                lowest, highest, num_tokens, num_experts, num_sequences, stride_logits_layer,
                stride_logits_token, BLOCK_T, BLOCK_N, TILES_PER_PROGRAM, SEGMENT_SLOTS,
                MAX_SEGMENT_SPAN, NUM_STAGES,
            )


@triton.jit
def _log1p(x):
    """log(1 + x) to fp32 relative accuracy for small x (Goldberg's trick); x >= -1."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _finalize_kernel(
    sums_ptr,  # [L, B, N] fp32
    counts_ptr,  # [B] fp32
    prior_ptr,
    js_ptr,  # [L, B] fp32 out
    grad_factor_ptr,  # [L, B, N] fp32 out
    num_experts,
    num_sequences,
    stride_prior_layer,
    stride_prior_sequence,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)  # layer * B + sequence
    layer = row // num_sequences
    sequence = row % num_sequences
    experts = tl.arange(0, BLOCK_N)
    expert_in_range = experts < num_experts

    count = tl.load(counts_ptr + sequence)
    has_tokens = count > 0
    safe_count = tl.where(has_tokens, count, 1.0)
    row_offset = row.to(tl.int64) * num_experts
    mean = tl.load(sums_ptr + row_offset + experts, mask=expert_in_range, other=0.0) / safe_count
    prior = tl.load(
        prior_ptr
        + layer.to(tl.int64) * stride_prior_layer
        + sequence.to(tl.int64) * stride_prior_sequence
        + experts,
        mask=expert_in_range,
        other=0.0,
    ).to(tl.float32)

    # With S = P + Q and d = (P − Q) / S, P = M(1 + d) and Q = M(1 − d), so expert n adds
    # ½[P·log(P/M) + Q·log(Q/M)] = S/4 · f(d), f(d) = (1 + d)·log(1 + d) + (1 − d)·log(1 − d).
    # Near d = 0, f ≈ d² while its two halves are ≈ ±d: summed as they stand they would leave
    # fp32 only eps/|d| relative accuracy, just where SARA converges. There f is formed as
    # d·(log(1 + d) − log(1 − d)) + log(1 − d²), parts ≈ 2d² and −d² that do not cancel, with
    # log1p of exactly formed arguments. Far from 0 the logs are taken of 1 ± d = 2P/S and 2Q/S
    # formed directly: d rounds to ±1 once one side is 2^25 times the other, and log(1 − 1) would
    # be −inf where the true log is finite. Shares below the smallest normal float count as 0
    # (the log would flush them to 0 and give −inf); their terms are below fp32 resolution.
    total = prior + mean
    safe_total = tl.where(total > 0, total, 1.0)
    difference = (prior - mean) / safe_total
    near = tl.abs(difference) < 0.5
    near_difference = tl.where(near, difference, 0.0)
    log_prior_near = _log1p(near_difference)
    log_mean_near = _log1p(-near_difference)
    f_near = (near_difference * (log_prior_near - log_mean_near)
              + _log1p(-near_difference * near_difference))
    prior_share = 2.0 * prior / safe_total
    mean_share = 2.0 * mean / safe_total
    log_prior_far = tl.log(tl.where(prior_share >= _SMALLEST_NORMAL, prior_share, 1.0))
    log_mean_far = tl.log(tl.where(mean_share >= _SMALLEST_NORMAL, mean_share, 1.0))
    f_far = prior_share * log_prior_far + mean_share * log_mean_far
    js = 0.25 * tl.sum(total * tl.where(near, f_near, f_far), axis=0)
    tl.store(js_ptr + row, tl.where(has_tokens, js, 0.0))

    # ∂JS/∂mean = ½·log(mean / midpoint); where mean_n = 0 every token's R_n is 0 too, so any
    # finite value is exact after the softmax backward — 0 avoids 0·(−inf). An empty sequence has
    # mean 0 everywhere, hence a zero factor.
    log_mean_ratio = tl.where(near, log_mean_near, log_mean_far)
    grad_factor = tl.where(mean > 0, 0.5 * log_mean_ratio / safe_count, 0.0)
    tl.store(grad_factor_ptr + row_offset + experts, grad_factor, mask=expert_in_range)


@triton.jit
def _backward_kernel(
    logits_ptr,
    segment_ids_ptr,
    grad_factor_ptr,  # [L, B, N] fp32: ½·log(mean / midpoint) / count
    grad_js_ptr,  # [L, B] fp32, contiguous
    grad_logits_ptr,
    num_tokens,
    num_experts,
    num_sequences,
    stride_logits_layer,
    stride_logits_token,
    stride_grad_layer,
    stride_grad_token,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
):
    chunk = tl.program_id(0)
    layer = tl.program_id(1)
    experts = tl.arange(0, BLOCK_N)
    expert_in_range = experts < num_experts
    layer_row = layer.to(tl.int64) * num_sequences
    for tile in tl.range(0, TILES_PER_PROGRAM, num_stages=NUM_STAGES):
        tokens = (chunk * TILES_PER_PROGRAM + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        exps, inverse_sum, segment, valid = _softmax_tile(
            logits_ptr, segment_ids_ptr, layer, tokens, experts, num_tokens, num_experts,
            num_sequences, stride_logits_layer, stride_logits_token,
        )
        safe_segment = tl.where(valid, segment, 0)
        grad_js = tl.load(grad_js_ptr + layer_row + safe_segment, mask=valid, other=0.0)
        # Each token's gradient factor row; rows repeat within a tile, so these loads hit L1.
        grad_factor = tl.load(
            grad_factor_ptr + (layer_row + safe_segment)[:, None] * num_experts + experts[None, :],
            mask=valid[:, None] & expert_in_range[None, :],
            other=0.0,
        )
        # With R = e·c (c = 1 / Σe) and s = ∂L/∂js: R ⊙ (g − ⟨g, R⟩)·s = e ⊙ (g·cs − ⟨g, e⟩·c·cs),
        # an FMA and a multiply per element beside the projection's multiply-add.
        row_scale = inverse_sum * grad_js
        projection = tl.sum(grad_factor * exps, axis=1) * inverse_sum
        grad_logits = exps * tl.fma(
            grad_factor, row_scale[:, None], -(projection * row_scale)[:, None]
        )
        if ROUND_BF16_BY_HAND:
            # Triton's interpreter (3.9) truncates fp32 -> bf16 where compiled code rounds to
            # nearest even; round here so that interpreter runs match the GPU.
            bits = grad_logits.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            grad_logits = bits.to(tl.float32, bitcast=True)
        tl.store(
            grad_logits_ptr
            + layer.to(tl.int64) * stride_grad_layer
            + tokens.to(tl.int64)[:, None] * stride_grad_token
            + experts[None, :],
            grad_logits.to(grad_logits_ptr.dtype.element_ty),
            mask=(tokens < num_tokens)[:, None] & expert_in_range[None, :],
        )


# Multiply-add contraction stays on whatever Triton's default becomes (3.9 warns that 3.10 turns it
# off): the per-element arithmetic and the tuned configs assume fused FMAs.
_COMPILER_OPTIONS = {"enable_fp_fusion": True}


def _for_device(kernel, device: torch.device):
    if device.type == "cpu" and isinstance(kernel, JITFunction):
        raise RuntimeError(
            "the routing JS Triton kernels got CPU tensors but Triton was imported without its "
            "interpreter: set TRITON_INTERPRET=1 before triton is first imported (triton.jit picks "
            "compiler or interpreter when a function is decorated, and triton.language's own "
            "helpers such as tl.max are decorated at import), or use impl='reference' on CPU"
        )
    return kernel


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How the token dimension is cut up; the expert dimension is always one padded block."""

    block_t: int  # tokens per tile, a power of two >= 16 (tl.dot's minimum)
    tiles_per_program: int  # consecutive tiles one program walks, loads pipelined across them
    num_warps: int
    # Tiles whose loads a program keeps in flight: Triton's software pipeliner, except in the
    # forward's periodic chunks, where any number above 1 is a prefetch of the next tile into
    # registers.
    num_stages: int
    # Forward only (the backward has one path): sum the chunks with periodic ids in one launch and
    # all other chunks in a second. A kernel's registers are those of its heaviest path, and the
    # periodic path (the usual one: [S, B] flattening, or chunks inside one packed sequence) needs
    # fewer on its own, so more programs fit on an SM; the price is a second launch whose programs
    # mostly only read their chunk's ids and exit.
    split_chunk_paths: bool = False
    # A cap on registers per thread for ptxas (Triton's `maxnreg`); None leaves them to ptxas.
    # Registers decide how many programs fit on an SM, and ptxas often meets a lower cap without
    # spilling by keeping fewer values live.
    max_registers: int | None = None

    def __post_init__(self):
        if self.block_t < 16 or self.block_t & (self.block_t - 1):
            raise ValueError(f"block_t must be a power of two >= 16, got {self.block_t}")
        if self.tiles_per_program < 1:
            raise ValueError(f"tiles_per_program must be >= 1, got {self.tiles_per_program}")
        if self.max_registers is not None and not 16 <= self.max_registers <= 255:
            raise ValueError(f"max_registers must be None or 16..255, got {self.max_registers}")


def expert_block(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def launch_config(
    num_layers: int, num_tokens: int, num_experts: int, direction: str = "forward"
) -> LaunchConfig:
    """The default launch for one problem size and direction ("forward" or "backward").

    Forward: several tiles per program, so the per-program register sums amortise the atomics.
    Backward: small tiles, one per program, so many light programs in flight hide the latency of
    the read-then-write. Other expert counts keep the same tile element count; the H100 timings
    behind these defaults are in docs/kernel.md.
    """
    block_n = expert_block(num_experts)
    if direction == "backward":
        block_t = max(16, min(256, _BACKWARD_TILE_ELEMENTS // block_n))
        return LaunchConfig(block_t, tiles_per_program=1, num_warps=4, num_stages=1)
    if direction != "forward":
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    block_t = max(16, min(256, _FORWARD_TILE_ELEMENTS // block_n))
    # Walk several tiles per program while that still leaves a few waves of programs on the GPU.
    tiles_per_program = 1
    while (
        tiles_per_program < _MAX_TILES_PER_PROGRAM
        and num_layers * triton.cdiv(num_tokens, block_t * tiles_per_program * 2) >= _MIN_PROGRAMS
    ):
        tiles_per_program *= 2
    return LaunchConfig(block_t, tiles_per_program, num_warps=4, num_stages=1)


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch, described before it runs, so that what `run` launches is what the
    benchmarks' `compile_for_target` compiles (static reports see the real specialisation)."""

    kernel: object  # a triton JITFunction (or the interpreter's stand-in)
    grid: tuple[int, ...]
    args: tuple  # runtime arguments, in the kernel's order, up to the first constexpr
    constexprs: dict  # constexpr name -> value
    num_warps: int
    max_registers: int | None = None

    @property
    def num_programs(self) -> int:
        return math.prod(self.grid)

    @property
    def compile_options(self) -> dict:
        """The launch options that reach the compiler."""
        options = dict(num_warps=self.num_warps, **_COMPILER_OPTIONS)
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options

    def run(self) -> None:
        device = next(arg.device for arg in self.args if isinstance(arg, torch.Tensor))
        _for_device(self.kernel, device)[self.grid](
            *self.args, **self.constexprs, **self.compile_options
        )


def accumulate_launches(
    logits, segment_ids, sums, counts, num_sequences: int, config: LaunchConfig
) -> list[KernelLaunch]:
    """The forward's accumulate launches, [L, T, N] logits into zeroed [L, B, N] sums and [B]
    counts: one, or with `config.split_chunk_paths` the periodic chunks' launch then the others'."""
    num_layers, num_tokens, num_experts = logits.shape
    chunk_paths = [(True, False), (False, True)] if config.split_chunk_paths else [(True, True)]
    return [
        KernelLaunch(
            _accumulate_kernel,
            grid=(triton.cdiv(num_tokens, config.block_t * config.tiles_per_program), num_layers),
            args=(
                logits, segment_ids, sums, counts, num_tokens, num_experts, num_sequences,
                logits.stride(0), logits.stride(1),
            ),
            constexprs=dict(
                BLOCK_T=config.block_t, BLOCK_N=expert_block(num_experts),
                TILES_PER_PROGRAM=config.tiles_per_program,
                TILES_POW2=triton.next_power_of_2(config.tiles_per_program),
                SEGMENT_SLOTS=SEGMENT_SLOTS, MAX_SEGMENT_SPAN=MAX_SEGMENT_SPAN,
                NUM_STAGES=config.num_stages,
                PERIODIC_CHUNKS=periodic_chunks, OTHER_CHUNKS=other_chunks,
            ),
            num_warps=config.num_warps,
            max_registers=config.max_registers,
        )
        for periodic_chunks, other_chunks in chunk_paths
    ]


def backward_launch(logits, segment_ids, grad_factor, grad_js, grad_logits, config: LaunchConfig):
    """The backward launch: ∂L/∂logits into `grad_logits` from the [L, B, N] factor and [L, B] ∂L/∂js."""
    num_layers, num_tokens, num_experts = logits.shape
    return KernelLaunch(
        _backward_kernel,
        grid=(triton.cdiv(num_tokens, config.block_t * config.tiles_per_program), num_layers),
        args=(
            logits, segment_ids, grad_factor, grad_js, grad_logits,
            num_tokens, num_experts, grad_factor.shape[1],
            logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1),
        ),
        constexprs=dict(
            BLOCK_T=config.block_t, BLOCK_N=expert_block(num_experts),
            TILES_PER_PROGRAM=config.tiles_per_program, NUM_STAGES=config.num_stages,
            ROUND_BF16_BY_HAND=logits.dtype == torch.bfloat16 and not _COMPILED,
        ),
        num_warps=config.num_warps,
        max_registers=config.max_registers,
    )


def _logits_3d(logits: torch.Tensor) -> torch.Tensor:
    # The kernels index the expert dim with unit stride; any layout of layers and tokens works.
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def routing_js_forward(
    logits: torch.Tensor,
    segment_ids: torch.Tensor,
    prior: torch.Tensor,
    *,
    process_group=None,
    config: LaunchConfig | None = None,
):
    """Forward on [L, T, N] logits, [T] ids, [L, B, N] prior (inputs already checked).

    Returns (js [L, B] fp32, token counts [B] fp32, grad factor [L, B, N] fp32), all global over
    `process_group` when one is given.
    """
    logits = _logits_3d(logits)
    segment_ids = segment_ids.contiguous()  # the kernels index ids by token
    num_layers, num_tokens, num_experts = logits.shape
    num_sequences = prior.shape[1]
    device = logits.device
    config = config or launch_config(num_layers, num_tokens, num_experts, "forward")

    # One buffer for sums and counts: one memset, and one all-reduce with a process group.
    num_sums = num_layers * num_sequences * num_experts
    stats = torch.zeros(num_sums + num_sequences, device=device, dtype=torch.float32)
    sums, counts = stats[:num_sums], stats[num_sums:]
    if num_tokens > 0 and num_layers > 0 and num_sequences > 0:
        for launch in accumulate_launches(logits, segment_ids, sums, counts, num_sequences, config):
            launch.run()
    elif num_layers == 0 and num_tokens > 0 and num_sequences > 0:
        # Layer 0's programs count the tokens; without layers the counts still say which
        # sequences have tokens.
        valid = (segment_ids >= 0) & (segment_ids < num_sequences)
        counts.index_add_(0, torch.where(valid, segment_ids, 0).long(), valid.to(torch.float32))
    if process_group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)

    js, grad_factor = divergence_from_sums(sums, counts, prior)
    return js, counts, grad_factor


def divergence_from_sums(sums: torch.Tensor, counts: torch.Tensor, prior: torch.Tensor):
    """The finalize step: js [L, B] and the gradient factor ½·log(mean / midpoint) / count
    [L, B, N] from the fp32 softmax sums (flat, L·B·N), the token counts [B] and the prior."""
    num_layers, num_sequences, num_experts = prior.shape
    device = prior.device
    prior = prior.to(torch.float32)
    if prior.stride(-1) != 1:
        prior = prior.contiguous()
    js = torch.empty(num_layers, num_sequences, device=device, dtype=torch.float32)
    grad_factor = torch.empty(num_layers, num_sequences, num_experts, device=device,
                              dtype=torch.float32)
    if num_layers * num_sequences > 0:
        block_n = expert_block(num_experts)
        _for_device(_finalize_kernel, device)[(num_layers * num_sequences,)](
            sums, counts, prior, js, grad_factor,
            num_experts, num_sequences, prior.stride(0), prior.stride(1),
            BLOCK_N=block_n, num_warps=1 if block_n <= 256 else 4, **_COMPILER_OPTIONS,
        )
    return js, grad_factor


def routing_js_backward(
    logits: torch.Tensor,
    segment_ids: torch.Tensor,
    grad_factor: torch.Tensor,
    grad_js: torch.Tensor,
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """∂L/∂logits [L, T, N] in the dtype of `logits`, from the saved [L, B, N] gradient factor."""
    logits = _logits_3d(logits)
    segment_ids = segment_ids.contiguous()
    num_layers, num_tokens, num_experts = logits.shape
    config = config or launch_config(num_layers, num_tokens, num_experts, "backward")
    grad_logits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    grad_js = grad_js.to(torch.float32).contiguous()
    if grad_logits.numel() > 0:
        backward_launch(logits, segment_ids, grad_factor, grad_js, grad_logits, config).run()
    return grad_logits
