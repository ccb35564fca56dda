"""torchrun worker: several training runs of one world size in one launch, each as tools/train.py
would run it.

Each case of --cases is {name, overrides (a list of "section.key=value"), max_steps (or null)};
"{out}" in an override stands for --out-dir. Every case is a fresh Trainer (Megatron's parallel
state re-initialised at the case's layout) through `train(cfg, max_steps)`, after the same output
checks as the tool. The JSON log defaults to <out-dir>/<name>.jsonl; rank 0 writes
<out-dir>/<name>.json = {"records": the JSON log's lines, "final_iteration"} as each case ends.
The processes and their imports start once for all cases (a run that must start in a process of
its own, such as a resume after the process ended, goes to a later launch).
"""

import argparse
import json
from pathlib import Path

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from sara_megatron.distributed import destroy_distributed
from sara_megatron.io import write_json_atomic
from sara_megatron.launch import configure_logging, launcher_rank, launcher_world_size
from sara_megatron.training import load_train_config, train
from sara_megatron.training.output_checks import check_before_start


def run_case(case: dict, out_dir: Path, rank: int) -> dict:
    overrides = [o.replace("{out}", str(out_dir)) for o in case["overrides"]]
    if not any(o.startswith("logging.json_log=") for o in overrides):
        overrides.append(f"logging.json_log={out_dir / (case['name'] + '.jsonl')}")
    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # as in a fresh process
    cfg = load_train_config(None, overrides)
    check_before_start(cfg, rank, launcher_world_size())
    result = train(cfg, max_steps=case.get("max_steps"))
    if rank != 0:  # the JSON log is rank 0's
        return {}
    with open(cfg.logging.json_log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {"records": records, "final_iteration": result.final_iteration}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True, help="JSON list of {name, overrides, max_steps}")
    p.add_argument("--out-dir", required=True, help="<name>.json per case, written as each ends")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    rank = launcher_rank()
    configure_logging(rank)
    for case in json.loads(args.cases):
        result = run_case(case, out_dir, rank)
        if rank == 0:
            write_json_atomic(out_dir / f"{case['name']}.json", result)
    destroy_distributed()


if __name__ == "__main__":
    main()
