"""torchrun worker: packed SARA training at several layouts in one launch.

Each case of --cases is {name, overrides (dotted config keys), steps}; every case trains the tiny
Qwen3-MoE from the same checkpoint with data.packing=true for `steps` steps, a fresh Trainer each
(Megatron's parallel state re-initialised at the case's layout). The LR schedule is `steps` long
unless --base or the case sets optim.train_steps (runs of different lengths on one schedule). Rank 0 writes <out-dir>/<name>.json as each
case ends: per step the CE, LB, JS, grad norm and the sorted sample ids the step trained on,
("language:id", a sample id names the parallel copies of one sample), gathered over data
parallel.
"""

import argparse
import json
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state as ps

from sara_megatron.distributed import destroy_distributed
from sara_megatron.io import write_json_atomic
from sara_megatron.training import Trainer, load_train_config


def run_case(base: list[str], case: dict) -> dict:
    overrides = [f"optim.train_steps={case['steps']}", *base,
                 *(f"{k}={v}" for k, v in case["overrides"].items())]
    trainer = Trainer(load_train_config(None, overrides))
    steps = []
    batches = trainer.state.batches
    for _ in range(case["steps"]):
        seen = []

        def recording():
            for mb in batches:
                seen.extend(f"{lang}:{sid}" for lang, sid in zip(mb.languages, mb.sample_ids))
                yield mb

        trainer.state.batches = recording()
        record = trainer.train_step()
        # over data parallel only: the ranks of a TP / CP group share their samples
        group = ps.get_data_parallel_group()
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, seen, group=group)
        steps.append(dict(ce=record.ce, lb=record.lb, js=record.js, grad_norm=record.grad_norm,
                          samples=sorted(s for rank in everyone for s in rank)))
    return {"steps": steps}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True, help="JSON list of {name, overrides, steps}")
    p.add_argument("--base", required=True, help="JSON object of config overrides for every case")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args()
    base = [f"{k}={v}" for k, v in json.loads(args.base).items()]
    for case in json.loads(args.cases):
        result = run_case(base, case)
        if dist.get_rank() == 0:
            write_json_atomic(Path(args.out_dir) / f"{case['name']}.json", result)
    destroy_distributed()


if __name__ == "__main__":
    main()
