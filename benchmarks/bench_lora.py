"""Step time and peak memory of LoRA-SARA against full SARA (benchmark, not a test).

The tiny CPU config on mock batches (random full-length rows and priors), both with SARA's
λ_JS = 1.5:

    python benchmarks/bench_lora.py --mock
    python benchmarks/bench_lora.py --mock --ranks 2 --rank 16 --set peft.router=frozen

or on the demo's data (`make demo` first) with `--work out/demo`; a real model cut to a few layers
on a GPU with `--preset qwen3_moe --num-layers 4 --seq-length 4096`.

Each variant runs in a process group of its own (`--ranks` ranks under torchrun), so that its
peak memory is its own: on CPU the peak resident set of the busiest rank (`ru_maxrss`: the
whole process, Python and libraries included), on a GPU `torch.cuda.max_memory_allocated`.
The step time is the median after warm-up (the slowest rank's). It also prints the trained and
total parameters of each variant (counted on the model). One JSON line; `--json` writes it too.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

from sara_megatron.tool_runner import torchrun_prefix

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu_sara.yaml")
VARIANTS = ("full", "lora")


def _overrides(args) -> list[str]:
    from bench_sara_step import data_and_model_overrides  # beside this script

    # First, so that --set (last) can change them; EP=2, the tiny config's, needs two ranks.
    return (["sara.lambda_js=1.5"] + (["parallel.ep=1"] if args.ranks == 1 else [])
            + data_and_model_overrides(args))


def _lora_overrides(args) -> list[str]:
    return ["peft.method=lora", f"peft.rank={args.rank}", f"peft.alpha={2 * args.rank}"]


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    """Collective: one trainer's median step and this process group's peak memory."""
    import torch
    import torch.distributed as dist

    from sara_megatron.training import Trainer, load_train_config

    trainer = Trainer(load_train_config(CONFIG, overrides + [f"optim.train_steps={steps + warmup}"]))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    records = [trainer.train_step() for _ in range(steps + warmup)][warmup:]
    middle = sorted(records, key=lambda r: r.step_time_s)[len(records) // 2]
    params = [p for chunk in trainer.state.chunks for p in chunk.parameters()]
    counts = torch.tensor([float(middle.step_time_s),
                           float(sum(p.numel() for p in params if p.requires_grad)),
                           float(sum(p.numel() for p in params)),
                           float(torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)],
                          dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # the slowest rank, the busiest memory
    return dict(step_s=counts[0].item(), trained_params_per_rank=int(counts[1]),
                params_per_rank=int(counts[2]), peak_memory_bytes=int(counts[3]),
                memory="cuda max_memory_allocated" if torch.cuda.is_available()
                else "peak RSS of the process (ru_maxrss)",
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")


def worker(args) -> None:
    """One variant, under torchrun: writes its result to --result."""
    import torch.distributed as dist

    from sara_megatron.distributed import destroy_distributed
    from sara_megatron.launch import configure_logging, exit_at_once_on_error, launcher_rank

    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank):
        overrides = _overrides(args) + (_lora_overrides(args) if args.variant == "lora" else [])
        result = measure(overrides, args.steps, args.warmup)
        if dist.get_rank() == 0:
            with open(args.result, "w") as f:
                json.dump(dict(result, config=overrides), f)
    destroy_distributed()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/demo", help="the demo's output (without --mock)")
    p.add_argument("--mock", action="store_true", help="mock batches instead of the demo's data")
    p.add_argument("--preset", help="model preset or HF config (default: the tiny config's)")
    p.add_argument("--num-layers", type=int, help="cut the preset to its first N layers")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    p.add_argument("--ranks", type=int, default=1, help="ranks of each variant's process group")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any further config override (both variants)")
    p.add_argument("--json")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a worker's
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    for flag in ("num_layers", "seq_length", "rank", "ranks", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.variant:
        worker(args)
        return
    if not args.mock and not os.path.isdir(args.work):
        p.error(f"--work {args.work}: no such directory (run `make demo` first, or use --mock)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = os.path.join(tmp, f"{variant}.json")
            forwarded = [f"--work={args.work}", f"--rank={args.rank}", f"--ranks={args.ranks}",
                         f"--steps={args.steps}", f"--warmup={args.warmup}"]
            forwarded += ["--mock"] if args.mock else []
            forwarded += [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                          for flag in ("preset", "num_layers", "seq_length")
                          if getattr(args, flag) is not None]
            forwarded += [f"--set={item}" for item in args.set]
            subprocess.run([*torchrun_prefix(args.ranks, "sara_megatron.torchrun"),
                            os.path.abspath(__file__), *forwarded,
                            "--variant", variant, "--result", out], check=True)
            with open(out) as f:
                results[variant] = json.load(f)
    full, lora = results["full"], results["lora"]
    summary = dict(full=full, lora=lora, lora_rank=args.rank, ranks=args.ranks,
                   step_time_lora_over_full=lora["step_s"] / full["step_s"],
                   peak_memory_lora_over_full=lora["peak_memory_bytes"] / full["peak_memory_bytes"])
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
