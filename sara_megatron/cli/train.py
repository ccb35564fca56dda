"""SARA fine-tuning (torchrun / srun). One YAML per run, `--set section.key=value` overrides.

    torchrun --nproc-per-node 8 tools/train.py --config examples/qwen3_30b_a3b_sara.yaml \
        --set data.shards_dir=data/shards --set data.prior_store=data/priors

λ_JS = 0 (`--set sara.lambda_js=0`) is the full fine-tuning baseline on the same code path.
A rank that fails prints its traceback and exits at once (torchrun then stops the others); an
error the user can fix (a bad setting, a damaged shard or checkpoint, a non-finite loss, an
unwritable output, a full disk) prints one line for the whole job, `train.py: error: ...`, and
exits 2 (with its traceback too under --debug); Ctrl-C prints `train.py: interrupted; rerun the
same command to resume` and exits 130. Start it with `python -m sara_megatron.torchrun` in place
of `torchrun` for those to be all the terminal shows, and the job's exit status.
"""

import argparse
import sys

from sara_megatron.distributed import destroy_distributed, launcher_world_size
from sara_megatron.launch import (
    ToolArgumentParser,
    configure_logging,
    exit_at_once_on_error,
    exit_with_parent,
    launcher_rank,
)
from sara_megatron.training import load_train_config, train
from sara_megatron.training.output_checks import check_before_start


def main(argv=None) -> int:
    """The `train` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    p = ToolArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="run YAML (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-5 (repeatable)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule keeps "
                   "its full length, so a later run resumes the same trajectory)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the token shards on their first open (same as "
                        "--set data.verify_shards=false; structure and token ids are checked)")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error the user can fix too")
    args = p.parse_args(argv)
    if not args.config and not args.overrides:
        p.error("a config is required: --config FILE (see examples/), and/or --set KEY=VALUE "
                "for each setting that differs from the defaults")
    if args.no_verify:
        args.overrides.append("data.verify_shards=false")
    exit_with_parent()
    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank, p.prog, debug=args.debug, resumable=True):
        cfg = load_train_config(args.config, args.overrides)
        check_before_start(cfg, rank, launcher_world_size())
        train(cfg, max_steps=args.max_steps)
    destroy_distributed()  # only after success: its barrier needs every rank


if __name__ == "__main__":
    sys.exit(main())
