"""torchrun worker: the extract_priors tool (`sara_megatron.cli.extract_priors`) at several
layouts in one launch, each into its own store under --out-root: data parallel 2, EP=2, PP=2, TP=2 (sequence parallel), and an EP=2 run
that resumes a store left half-finished (as by a kill) by the data-parallel run."""

import argparse
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from sara_megatron.cli import extract_priors as tool
from sara_megatron.distributed import destroy_distributed

LAYOUTS = {"dp2": [], "ep2": ["--ep", "2"], "pp2": ["--pp", "2"], "tp2": ["--tp", "2"]}


def half_finished_copy(done: Path, target: Path) -> None:
    """`done` as a kill would leave it: some shards on disk, store.json not yet complete."""
    shutil.copytree(done, target)
    store = json.loads((target / "store.json").read_text())
    for shard in store["shards"][1::2]:
        for suffix in (".npy", ".ids.json"):
            os.remove(target / "shards" / (shard["name"] + suffix))
    store.update(complete=False, shards=[], num_samples=0)
    (target / "store.json").write_text(json.dumps(store))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--model", default="qwen3_moe_tiny")
    p.add_argument("--out-root", required=True)
    args = p.parse_args()
    out = Path(args.out_root)
    common = ["--shards", args.shards, "--checkpoint", args.ckpt, "--model", args.model,
              "--micro-batch-size", "3", "--flush-every", "4"]
    for name, layout in LAYOUTS.items():
        tool.run(tool.parse_args(common + layout + ["--output", str(out / name)]))
    if dist.get_rank() == 0:
        half_finished_copy(out / "dp2", out / "ep2_resumed")
    dist.barrier()
    result = tool.run(tool.parse_args(common + ["--ep", "2", "--output", str(out / "ep2_resumed")]))
    resumed = {"samples_resumed": result["samples_resumed"],
               "samples_extracted": result["samples_extracted"]}
    if dist.get_rank() == 0:
        (out / "resume.json").write_text(json.dumps(resumed))
    destroy_distributed()


if __name__ == "__main__":
    main()
