"""Forward+backward time of a model preset at a parallel layout (benchmark, not a test).

    torchrun --nproc-per-node 2 benchmarks/bench_model_step.py --preset qwen3_moe_tiny --ep 2

Each data-parallel rank runs its own micro-batch; rank 0 prints the median step time over
--steps timed steps after --warmup, and the device it ran on.
"""

import argparse
import dataclasses
import json
import statistics
import time

import torch
import torch.distributed as dist

from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.models.architecture import resolve_architecture
from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="qwen3_moe_tiny")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--num-layers", type=int, help="cut the preset to this many layers")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()

    arch = resolve_architecture(args.preset)
    if args.num_layers:
        arch = dataclasses.replace(arch, num_layers=args.num_layers)
    arch.validate_parallel(tp=args.tp, ep=args.ep)
    initialize_distributed(ParallelConfig(tp=args.tp, ep=args.ep))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_model(arch, ModelOptions(params_dtype=dtype, bf16=args.bf16))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.train()
    b, s = args.micro_batch, args.seq_length
    tokens = torch.randint(0, arch.vocab_size, (b, s), device=device)
    positions = torch.arange(s, device=device).expand(b, s)
    mask = causal_attention_mask(s, device=device)

    def step():
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = torch.tensor(statistics.median(times), device=device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        result = dict(preset=args.preset, num_layers=arch.num_layers, tp=args.tp, ep=args.ep, world=dist.get_world_size(),
                      micro_batch=b, seq_length=s, dtype=str(dtype), device=where,
                      median_step_s=median.item())
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
