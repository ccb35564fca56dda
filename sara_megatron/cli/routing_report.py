"""Dense routing report of a model on synthetic tokens (TP and EP layouts).

    torchrun --nproc-per-node 2 tools/routing_report.py --preset qwen3_moe_tiny --ep 2
    python tools/routing_report.py --preset out/demo/hf --checkpoint out/demo/base

Without --checkpoint the model has its random initial weights, which depend on the layout.

Each data-parallel rank routes its own sequences; rank 0 prints every layer's masked
sequence-mean routing distribution (fp32 softmax over all experts, padding excluded).
"""

import argparse
import sys
import os

from sara_megatron.analysis.dense_routing_report import dense_routing_report
from sara_megatron.distributed import destroy_distributed
from sara_megatron.launch import configure_logging, exit_at_once_on_error, launcher_rank
from sara_megatron.models.architecture import PRESET_NAMES, resolve_architecture
from sara_megatron.priors import parse_layer_selection
from sara_megatron.tool_errors import InputError


def parse_args(argv=None):
    """The checked command line, with `arch` and `layers` resolved.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
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
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error the user can fix too")
    args = p.parse_args(argv)
    for name in ("sequences_per_rank", "seq_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    try:
        args.arch = resolve_architecture(args.preset)
    except InputError as err:
        p.error(f"--preset: {err}")
    try:
        args.layers = list(parse_layer_selection(args.layers, args.arch.num_layers))
    except ValueError as err:
        p.error(f"--layers: {err}")
    return args


def main(argv=None) -> int:
    """The `routing_report` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank, debug=args.debug):
        run(args)
    destroy_distributed()  # only after success: its barrier needs every rank


def run(args):
    """Collective: route this data-parallel rank's sequences; rank 0 prints every row.

    Args:
        args: The parsed command line.
    """
    dense_routing_report(
        args.arch, preset=args.preset, layers=args.layers, checkpoint=args.checkpoint,
        tp=args.tp, ep=args.ep, sequences_per_rank=args.sequences_per_rank,
        seq_length=args.seq_length, seed=args.seed, json_path=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
