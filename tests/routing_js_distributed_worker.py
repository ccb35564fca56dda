"""Two gloo ranks each hold half of every sequence; writes what each rank computed, and the one-rank
result on the whole batch, for tests/test_routing_js_distributed.py to compare.

    TRITON_INTERPRET=1 python tests/routing_js_distributed_worker.py --out DIR

Megatron's [S, B] token order is split along S, as sequence / context parallelism splits it: rank r
holds positions [r·S/2, (r+1)·S/2) of every sequence. Sequence 1 is shorter than S/2, so rank 1 holds
none of its tokens yet must see its global JS; sequence 2 has no token at all.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
LAYERS, POSITIONS, SEQUENCES, EXPERTS = 2, 24, 3, 60
SEQUENCE_LENGTHS = (24, 10, 0)
IMPLEMENTATIONS = ("triton", "reference")


def global_inputs():
    generator = torch.Generator().manual_seed(1234)
    logits = 3.0 * torch.randn(LAYERS, POSITIONS * SEQUENCES, EXPERTS, generator=generator)
    prior = torch.softmax(torch.randn(LAYERS, SEQUENCES, EXPERTS, generator=generator), -1)
    prior[..., :7] = 0.0
    prior = prior / prior.sum(-1, keepdim=True)
    position = torch.arange(POSITIONS * SEQUENCES) // SEQUENCES
    sequence = torch.arange(POSITIONS * SEQUENCES) % SEQUENCES
    lengths = torch.tensor(SEQUENCE_LENGTHS)
    segment_ids = torch.where(position < lengths[sequence], sequence, -1)
    upstream = torch.randn(LAYERS, SEQUENCES, generator=generator)
    return logits, segment_ids, prior, upstream


def local_token_slice(rank: int) -> slice:
    """Rank `rank`'s tokens in [S, B] order: a contiguous block of positions."""
    positions_per_rank = POSITIONS // WORLD_SIZE
    return slice(rank * positions_per_rank * SEQUENCES, (rank + 1) * positions_per_rank * SEQUENCES)


def loss_and_grad(impl, logits, segment_ids, prior, upstream, process_group):
    from sara_megatron.kernels import sequence_routing_js

    logits = logits.clone().requires_grad_(True)
    js, counts = sequence_routing_js(
        logits, segment_ids, prior, process_group=process_group, return_counts=True, impl=impl
    )
    (grad,) = torch.autograd.grad((js * upstream).sum(), logits)
    return {"js": js.detach(), "counts": counts, "grad": grad}


def run_rank(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        logits, segment_ids, prior, upstream = global_inputs()
        tokens = local_token_slice(rank)
        results = {}
        for impl in IMPLEMENTATIONS:
            local = loss_and_grad(
                impl, logits[:, tokens], segment_ids[tokens], prior, upstream, dist.group.WORLD
            )
            results.update({f"{impl}_{key}": value for key, value in local.items()})
            if rank == 0:
                single = loss_and_grad(impl, logits, segment_ids, prior, upstream, None)
                results.update({f"single_{impl}_{key}": value for key, value in single.items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for rank0.pt and rank1.pt")
    args = parser.parse_args()
    mp.spawn(run_rank, args=(free_port(), args.out), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
