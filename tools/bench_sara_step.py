"""Step time of SARA vs the same run without it (benchmark, not a test).

    make demo    # once: leaves shards, a converted base checkpoint and priors in out/demo
    torchrun --nproc-per-node 2 tools/bench_sara_step.py --work out/demo

Runs the tiny CPU config (examples/tiny_cpu_sara.yaml, EP=2) three ways in one process group:
SARA (λ_JS 1.5), λ_JS = 0 with priors (the FFT baseline: same code path), and plain fine-tuning
with no prior store (no routing-JS work at all), and prints the median step time of each after
warm-up and the ratios to plain. Rank 0 prints; the device is named.
"""

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from sara_megatron.distributed import destroy_distributed
from sara_megatron.training import Trainer, load_train_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu_sara.yaml")


def median_step(work: str, overrides: list[str], steps: int, warmup: int) -> float:
    base = [f"model.preset={work}/hf", f"model.checkpoint={work}/base",
            f"data.shards_dir={work}/shards", f"data.prior_store={work}/priors",
            f"optim.train_steps={steps + warmup}", "logging.log_interval=1000000"]
    trainer = Trainer(load_train_config(CONFIG, base + overrides))
    times = [trainer.train_step().step_time_s for _ in range(steps + warmup)][warmup:]
    t = torch.tensor(statistics.median(times), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/demo")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    work = os.path.abspath(args.work)
    try:
        plain = median_step(work, ["sara.lambda_js=0", "data.prior_store=null"], args.steps, args.warmup)
        fft = median_step(work, ["sara.lambda_js=0"], args.steps, args.warmup)
        sara = median_step(work, ["sara.lambda_js=1.5"], args.steps, args.warmup)
        if dist.get_rank() == 0:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
            result = dict(device=device, world=dist.get_world_size(), plain_s=plain,
                          fft_lambda0_s=fft, sara_s=sara, sara_over_plain=sara / plain,
                          sara_over_fft=sara / fft)
            print(json.dumps(result))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
