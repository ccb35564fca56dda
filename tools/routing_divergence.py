"""Per-layer routing divergence JS(anchor ‖ target) of a checkpoint on token shards.

    python tools/routing_divergence.py --shards data/shards --checkpoint runs/sara/iter_0000040 \
        --model qwen3_moe_tiny --json divergence.json

Loads model weights from a converted or a training checkpoint (any layout it was saved at) and
prints, per layer and target language, the mean over samples of the JS divergence between the
target's and its anchor's sequence-mean dense routing under this model. Under torchrun, a rank
that fails prints its traceback and exits at once (torchrun then stops the others).
"""

import argparse
import json
import os

from sara_megatron.analysis import format_divergence_table, routing_divergence
from sara_megatron.checkpointing import load_model_weights
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.models.architecture import resolve_architecture
from sara_megatron.models.builder import build_model
from sara_megatron.priors import parse_layer_selection
from sara_megatron.tool_errors import check_writable_output
from sara_megatron.training.launch import (
    configure_logging,
    exit_at_once_on_error,
    exit_with_parent,
    launcher_rank,
)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--checkpoint", required=True, help="Megatron checkpoint folder (torch_dist)")
    p.add_argument("--model", required=True, help="preset name or HF config.json")
    p.add_argument("--layers", default="all", help="'all', '7-34' or '0,3,8-11'")
    p.add_argument("--languages", nargs="*", help="target languages (default: all targets)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="write {language: [JS per layer]} here")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the token shards on first open (structure "
                        "and token ids are checked)")
    args = p.parse_args()
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    if not os.path.isdir(args.shards):
        p.error(f"--shards {args.shards}: no such directory")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")
    if args.json:
        try:  # before the compute, not after the table
            check_writable_output(args.json, "--json", is_file=True)
        except OSError as err:
            p.error(str(err.strerror or err))

    try:
        arch = resolve_architecture(args.model)
        layers = parse_layer_selection(args.layers, arch.num_layers)
    except (ValueError, OSError) as err:
        p.error(f"--model / --layers: {err}")

    exit_with_parent()
    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank, "routing_divergence.py", output=args.json):
        initialize_distributed(ParallelConfig())
        model = build_model(arch)
        load_model_weights(model, args.checkpoint)
        shards = TokenShards(args.shards, verify=not args.no_verify)
        result = routing_divergence(model, shards, layers, args.languages, args.batch_size)
        print(format_divergence_table(layers, {"JS": result}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"layers": list(layers), "divergence": result}, f, indent=1)
    destroy_distributed()  # only after success: its barrier needs every rank


if __name__ == "__main__":
    main()
