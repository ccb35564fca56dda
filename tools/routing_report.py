"""Dense routing report of a model on synthetic tokens (TP and EP layouts).

    torchrun --nproc-per-node 2 tools/routing_report.py --preset qwen3_moe_tiny --ep 2
    python tools/routing_report.py --preset out/demo/hf --checkpoint out/demo/base

Without --checkpoint the model has its random initial weights, which depend on the layout.

Each data-parallel rank routes its own sequences; rank 0 prints every layer's masked
sequence-mean routing distribution (fp32 softmax over all experts, padding excluded).
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.launch import configure_logging, exit_at_once_on_error, launcher_rank
from sara_megatron.models.architecture import PRESET_NAMES, resolve_architecture
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.priors import parse_layer_selection
from sara_megatron.routing import capture_routing, segment_ids_from_padding_mask
from sara_megatron.routing.report import format_routing_report, routing_rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="qwen3_moe_tiny",
                   help=f"one of {', '.join(PRESET_NAMES)} or an HF config.json path")
    p.add_argument("--checkpoint", help="Megatron checkpoint folder (converted or trained) to load")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--sequences-per-rank", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--layers", default="all",
                   help="global 0-based layers: 'all', '7-34' or '0,3,8-11' (default: all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="also write the rows as JSON here (rank 0)")
    args = p.parse_args()
    for name in ("sequences_per_rank", "seq_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    args.arch = resolve_architecture(args.preset)
    try:
        args.layers = list(parse_layer_selection(args.layers, args.arch.num_layers))
    except ValueError as err:
        p.error(f"--layers: {err}")
    return args


def main():
    args = parse_args()
    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank):
        run(args)
    destroy_distributed()  # only after success: its barrier needs every rank


def run(args):
    """Collective: route this data-parallel rank's sequences; rank 0 prints every row."""
    arch = args.arch
    arch.validate_parallel(tp=args.tp, ep=args.ep)
    initialize_distributed(ParallelConfig(tp=args.tp, ep=args.ep), seed=args.seed)
    from megatron.core import parallel_state as ps

    model = build_model(arch)
    if args.checkpoint:
        load_model_weights(model, args.checkpoint)
    model.eval()
    device = next(model.parameters()).device
    dp_rank = ps.get_data_parallel_rank()
    b, s = args.sequences_per_rank, args.seq_length
    g = torch.Generator().manual_seed(args.seed + dp_rank)
    tokens = torch.randint(0, arch.vocab_size, (b, s), generator=g).to(device)
    padding = torch.zeros(b, s, dtype=torch.bool, device=device)
    padding[-1, s - s // 4:] = True  # the last sequence of each rank is right-padded
    positions = torch.arange(s, device=device).expand(b, s)
    with torch.no_grad(), capture_routing(
        segment_ids_from_padding_mask(padding), layers=args.layers
    ) as capture:
        model(tokens, positions, causal_attention_mask(s, device=device))
    rows = routing_rows(capture, sequence_offset=dp_rank * b)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows if ps.get_tensor_model_parallel_rank() == 0 else [])
    if dist.get_rank() == 0:
        all_rows = [r for part in gathered for r in part]
        print(f"dense routing report: preset={args.preset} experts={arch.num_experts} "
              f"top-k={arch.moe_router_topk} world={dist.get_world_size()} "
              f"tp={args.tp} ep={args.ep} dp={ps.get_data_parallel_world_size()}")
        print(format_routing_report(all_rows, arch.num_experts))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
