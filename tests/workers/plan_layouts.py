"""torchrun worker (2 ranks): models actually built at TP=2, EP=2 and PP=2 (tiny presets), each
rank's parameter counts and checkpoint regions written for the planner's test to compare with
what `sara_megatron.planning` derives from one meta-device build.

Arguments: --out-dir; writes <out-dir>/<preset>_<layout>.json as each case ends:
{"ranks": [{"tp_rank", "ep_rank", "pp_rank", "dense", "expert", "regions": [[key, index, box]]}]}.
Experts are told apart by name here ("mlp.experts."), not by the planner's module rule.
"""

import argparse
import json
import os

import torch.distributed as dist

from sara_megatron.conversion.hf_import import _sharded_tensors
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import ModelOptions, build_model

PRESETS = ("qwen3_moe_tiny", "phi35_moe_tiny")
LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}


def rank_report(arch) -> dict:
    from megatron.core import parallel_state as ps

    model = build_model(arch, ModelOptions(perform_initialization=False))
    dense = expert = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            expert += param.numel()
        else:
            dense += param.numel()
    regions = []
    for sh in _sharded_tensors(model):
        n = sh.prepend_axis_num
        box = [[o, o + s] for o, s in zip(sh.global_offset[n:], sh.local_shape)]
        regions.append([sh.key, list(sh.global_offset[:n]), box])
    return {"tp_rank": ps.get_tensor_model_parallel_rank(),
            "ep_rank": ps.get_expert_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dense": dense, "expert": expert, "regions": regions}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    args = p.parse_args()
    for preset in PRESETS:
        arch = get_preset(preset)
        for layout, sizes in LAYOUTS.items():
            initialize_distributed(ParallelConfig(**sizes))
            mine = rank_report(arch)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            if dist.get_rank() == 0:
                with open(os.path.join(args.out_dir, f"{preset}_{layout}.json"), "w") as f:
                    json.dump({"ranks": ranks}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
