"""`make experiment`: the paper's claim tested end to end at small scale on CPU.

A tiny Qwen3-MoE is trained from scratch on a rule-translated reasoning task in the anchor
language (cached by content hash), then fine-tuned from it on the same parallel corpus with FFT,
SARA and the other objectives that exist, over several seeds; every model is evaluated with
tools/evaluate.py on held-out items in every language, and tools/report.py writes
<work>/report.md with the accuracy table, the significance tests, the divergence curves and
training dynamics, followed by a verdict written from the numbers (docs/experiment.md).

    python tools/experiment.py --work out/experiment                     # make experiment
    python tools/experiment.py --quick --work out/experiment             # FFT and SARA, 3 seeds
    python tools/experiment.py --methods fft,sara,aes,sara_all,sara_random   # + Table 2's -a, -r
    python tools/experiment.py --reduced --work out/experiment_reduced   # what the tests run

<work>/summary.json holds the numbers; report.md's verdict is written from it.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from sara_megatron.experiment.run import (
    ABLATIONS, METHODS, ExperimentSettings, quick_settings, reduced_settings, run_experiment)
from sara_megatron.experiment.tool_runs import StepFailed
from sara_megatron.tool_errors import report_user_error


def main(argv=None) -> int:
    """The `experiment` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    full = ExperimentSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="out/experiment", help="work and report folder (default "
                   "out/experiment); its base/ subfolder caches base models")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true",
                      help="the small version the test suite runs: a small world, two seeds, FFT "
                           "and SARA, fewer steps and items; the flags below override it")
    size.add_argument("--quick", action="store_true",
                      help="the full run's base model and items, FFT and SARA over 3 seeds: a "
                           "first look, not the powered comparison")
    p.add_argument("--seeds", type=int, help=f"fine-tuning seeds per method ({full.seeds})")
    p.add_argument("--methods", help=f"comma-separated, among {', '.join(METHODS)}; fft is the "
                   f"baseline ({','.join(full.methods)}; {' and '.join(ABLATIONS)} are the "
                   "paper's all-layer and random-layer ablations)")
    p.add_argument("--base-steps", type=int,
                   help=f"training steps of the base model ({full.base.train_steps})")
    p.add_argument("--finetune-steps", type=int, help=f"({full.finetune_steps})")
    p.add_argument("--finetune-lr", type=float, help=f"peak learning rate of fine-tuning "
                   f"({full.finetune_lr}; the base trains at {full.base.lr})")
    p.add_argument("--lambda-js", type=float, help=f"SARA's λ_JS ({full.lambda_js})")
    p.add_argument("--eval-items", type=int,
                   help=f"held-out arithmetic items per language ({full.eval_math_items}; the "
                   "lookups are the world's facts)")
    p.add_argument("--jobs", type=int, help=f"fine-tuning runs at once, one process each "
                   f"({full.jobs})")
    args = p.parse_args(argv)
    settings = reduced_settings() if args.reduced else quick_settings() if args.quick else full
    for flag in ("seeds", "base_steps", "finetune_steps", "eval_items", "jobs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.finetune_lr is not None and args.finetune_lr <= 0:
        p.error(f"--finetune-lr must be > 0, got {args.finetune_lr}")
    if args.lambda_js is not None and args.lambda_js <= 0:
        p.error(f"--lambda-js must be > 0 (λ_JS = 0 is FFT, the baseline), got {args.lambda_js}")
    changes = {}
    if args.methods is not None:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in changes["methods"] if m not in METHODS]
        if unknown or "fft" not in changes["methods"]:
            p.error(f"--methods must include fft and be among {', '.join(METHODS)}; got "
                    f"{args.methods}")
    for flag in ("seeds", "finetune_steps", "finetune_lr", "lambda_js", "jobs"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    if args.eval_items is not None:
        changes["eval_math_items"] = args.eval_items
    if args.base_steps is not None:
        changes["base"] = dataclasses.replace(settings.base, train_steps=args.base_steps)
    settings = dataclasses.replace(settings, **changes)
    try:
        report = run_experiment(Path(args.work), settings)
    except StepFailed as e:  # the failing tool's own log says why (exit 1)
        print(f"{p.prog}: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - a user error is one line; anything else raises
        sys.exit(report_user_error(p.prog, e, args.work))
    print(f"[experiment] report: {report}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
