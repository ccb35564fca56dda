"""Extract anchor routing priors into a prior store (torchrun; any TP / EP / PP / DP layout).

    torchrun --nproc-per-node 8 tools/extract_priors.py --shards data/shards \
        --checkpoint ckpt/qwen3-30b-a3b --output data/priors \
        --layers 7-34 --ep 8 --micro-batch-size 2

Runs the anchor-language sequences of the token shards (tools/shard_corpus.py) through the model
before fine-tuning and stores, per sample and layer, the masked sequence mean of the dense fp32
routing softmax over all experts. Every non-padding token counts (prompt and response). A rerun
after a kill skips the samples already stored. The store records the model's fingerprint (see
sara_megatron/priors/fingerprint.py) and the anchor shards' fingerprint.
A rank that fails prints its traceback and exits at once (torchrun then stops the others); a
damaged shard or checkpoint, a folder that is not a Megatron-Core checkpoint, --layers or a
layout outside the model, priors of another model, an unwritable --output or a full disk prints
one line for the whole job and exits 2; Ctrl-C prints one line and exits 130 (rerun to resume).
Start it with `python -m sara_megatron.torchrun` in place of `torchrun` for that line to be all
the terminal shows, and the job's exit status.
"""

import argparse
import os
import sys

from sara_megatron.distributed import destroy_distributed
from sara_megatron.launch import (
    ToolArgumentParser,
    configure_logging,
    exit_at_once_on_error,
    exit_with_parent,
    launcher_rank,
)
from sara_megatron.models.architecture import PRESET_NAMES
from sara_megatron.priors.extraction_job import ExtractionJob, run_extraction_job
from sara_megatron.tool_errors import check_writable_output


def parse_args(argv=None):
    """The checked command line (sizes, folders, a writable output), before any model is built.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = ToolArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", required=True, help="token shard directory (tools/shard_corpus.py)")
    p.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory (torch_dist)")
    p.add_argument("--model",
                   help=f"preset ({', '.join(PRESET_NAMES)}) or an HF config.json path; default: "
                        "the config.json the converter kept in <checkpoint>/hf_assets/")
    p.add_argument("--output", required=True, help="prior store directory")
    p.add_argument("--layers", default="all", help="'all', '7-34' (inclusive) or '0,3,8-11'")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="storage dtype of the priors (computed in fp32 either way)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per schedule call (default: PP size, to fill the pipeline)")
    p.add_argument("--flush-every", type=int, default=256,
                   help="samples per store shard and replica (what a kill can cost)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack several samples per row (block-diagonal attention, per-sample "
                        "positions; the same priors as --no-packing, without the padding)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 weights and activations (router logits and softmax stay fp32); "
                        "recorded in the store: resuming it without --bf16 is refused, and "
                        "the other way round")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the token shards against their manifest on "
                        "first open (structure and token ids are checked; the corpus "
                        "fingerprint is computed from the files either way)")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error the user can fix too")
    args = p.parse_args(argv)
    # Checked here, not after the model is built and loaded (and a store.json written).
    for flag in ("tp", "ep", "pp", "micro_batch_size", "num_microbatches", "flush_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    if not os.path.isdir(args.shards):
        p.error(f"--shards {args.shards}: no such directory")
    try:
        check_writable_output(args.output, "--output")
    except OSError as err:
        p.error(str(err.strerror or err))
    return args


def run(args) -> dict:
    """Collective: (re)initialise Megatron at the requested layout and extract the store.

    Args:
        args: The parsed command line.

    Returns:
        `extract_priors`' summary: samples_extracted, samples_resumed, tokens, fill_rate,
        elapsed_s and store.
    """
    return run_extraction_job(ExtractionJob(
        shards=args.shards, checkpoint=args.checkpoint, output=args.output, model=args.model,
        layers=args.layers, dtype=args.dtype, tp=args.tp, ep=args.ep, pp=args.pp,
        micro_batch_size=args.micro_batch_size, num_microbatches=args.num_microbatches,
        flush_every=args.flush_every, packing=args.packing, bf16=args.bf16, verify_shards=not args.no_verify,
    ))


def main(argv=None) -> int:
    """The `extract_priors` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    exit_with_parent()
    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank, "extract_priors.py", output=args.output, debug=args.debug,
                               resumable=True):
        run(args)
    destroy_distributed()  # only after success: its barrier needs every rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
