"""Step time of SARA vs the FFT baseline (benchmark, not a test).

The tiny CPU config, on the demo's data:

    make demo    # once: leaves shards, a converted base checkpoint and priors in out/demo
    torchrun --nproc-per-node 2 benchmarks/bench_sara_step.py --work out/demo

A real model cut to a few layers, on mock batches (random full-length rows, random priors), e.g.
Qwen3-30B-A3B on one H100:

    torchrun --nproc-per-node 1 benchmarks/bench_sara_step.py --mock --preset qwen3_moe \
        --num-layers 4 --seq-length 4096 --micro-batch 1 --global-batch 8

Runs in one process group, each a fresh Trainer: plain fine-tuning with no priors (no routing-JS
work at all; not with --mock, whose batches always carry priors), λ_JS = 0 with priors (the FFT
baseline: the SARA code path), and SARA (λ_JS 1.5). Rank 0 prints the median step time of each after warm-up, the
ratios, tokens/s and model TFLOP/s per GPU (`sara_megatron.models.flops`), and the device.
A rank that fails prints its traceback and exits at once (torchrun then stops the others).
"""

import argparse
import json
import math
import os

import torch
import torch.distributed as dist

from sara_megatron.distributed import destroy_distributed, read_launcher_env
from sara_megatron.launch import configure_logging, exit_at_once_on_error, launcher_rank
from sara_megatron.training import Trainer, load_train_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu_sara.yaml")


def median_step(base: list[str], overrides: list[str], steps: int, warmup: int) -> dict:
    trainer = Trainer(load_train_config(CONFIG, base + [f"optim.train_steps={steps + warmup}"]
                                        + overrides))
    records = [trainer.train_step() for _ in range(steps + warmup)][warmup:]
    middle = sorted(records, key=lambda r: r.step_time_s)[len(records) // 2]  # the median step
    # The slowest rank sets the pace.
    t = torch.tensor(middle.step_time_s, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    scale = middle.step_time_s / float(t)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(step_s=float(t), tokens_per_s=middle.tokens_per_s * scale,
                tflops_per_gpu=middle.tflops_per_gpu * scale)


def fitting_ep(parallel, world_size: int) -> int:
    """The largest divisor of the config's EP that the world's data × context parallel ranks can
    hold: the tiny config's EP 2 on two ranks, 1 on one (where EP 2 would be refused)."""
    dp = world_size // (parallel.tp * parallel.pp * parallel.cp)
    return math.gcd(parallel.ep, dp * parallel.cp) or 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/demo", help="the demo's output (without --mock)")
    p.add_argument("--mock", action="store_true", help="mock batches instead of the demo's data")
    p.add_argument("--preset", help="model preset or HF config (default: the tiny config's)")
    p.add_argument("--num-layers", type=int, help="cut the preset to its first N layers")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--ep", type=int, help="expert parallel size (default: the tiny config's 2, "
                   "or what of it fits the world: 1 on one rank)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any further config override")
    p.add_argument("--json")
    args = p.parse_args()
    for flag in ("num_layers", "seq_length", "micro_batch", "global_batch", "ep", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.mock and not os.path.isdir(args.work):
        p.error(f"--work {args.work}: no such directory (run `make demo` first, or use --mock)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")

    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank):
        run(args)
    destroy_distributed()  # only after success: its barrier needs every rank


def data_and_model_overrides(args) -> list[str]:
    """Config overrides of the data (--mock, or the demo's --work) and of the model and batch
    flags given (also benchmarks/bench_lora.py's; a flag it lacks counts as not given), with
    logging and checkpoint saving off, then --set's."""
    if args.mock:
        base = ["data.mock=true", "model.checkpoint=null", "data.shards_dir=null",
                "data.prior_store=null", "sara.layers=all"]
    else:
        work = os.path.abspath(args.work)
        base = [f"model.preset={work}/hf", f"model.checkpoint={work}/base",
                f"data.shards_dir={work}/shards", f"data.prior_store={work}/priors"]
    for key, flag in (("model.preset", "preset"), ("model.num_layers", "num_layers"),
                      ("data.seq_length", "seq_length"), ("data.micro_batch_size", "micro_batch"),
                      ("data.global_batch_size", "global_batch"), ("parallel.ep", "ep")):
        value = getattr(args, flag, None)
        if value is not None:
            base.append(f"{key}={value}")
    return base + ["logging.log_interval=1000000", "checkpoint.save_dir=null", *args.set]


def run(args) -> None:
    """Collective: the three step-time measurements; rank 0 prints (and writes) the result."""
    base = data_and_model_overrides(args)
    if args.ep is None and not any(item.startswith("parallel.ep=") for item in args.set):
        ep = fitting_ep(load_train_config(CONFIG, base).parallel, read_launcher_env().world_size)
        base.append(f"parallel.ep={ep}")
    priors = "data.mock=true" if args.mock else f"data.prior_store={os.path.abspath(args.work)}/priors"
    plain = None
    if not args.mock:  # mock batches always carry priors
        plain = median_step(base, ["sara.lambda_js=0", "data.prior_store=null"], args.steps,
                            args.warmup)
    fft = median_step(base, ["sara.lambda_js=0", priors], args.steps, args.warmup)
    sara = median_step(base, ["sara.lambda_js=1.5", priors], args.steps, args.warmup)
    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        result = dict(device=device, world=dist.get_world_size(), config=base,
                      fft_lambda0=fft, sara=sara, sara_over_fft=sara["step_s"] / fft["step_s"])
        if plain is not None:
            result.update(plain=plain, sara_over_plain=sara["step_s"] / plain["step_s"])
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main()
