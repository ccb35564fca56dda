"""One report of runs, evaluations and routing divergence: report.md plus its PNG figures.

    python tools/report.py --out report/ \
        --divergence before=div_base.json --divergence FFT=div_fft.json --divergence SARA=div_sara.json \
        --run SARA=runs/sara.jsonl --run FFT=runs/fft.jsonl \
        --eval base=eval/base --eval FFT=eval/fft --eval SARA=eval/sara --baseline FFT \
        --checkpoint-eval SARA:500=eval/sara_500 --checkpoint-eval SARA:1000=eval/sara \
        --expert-usage usage.json --usage-layers 7,20,34

Sections: routing divergence (table, U-curve of the first --divergence or --divergence-baseline
with its suggested alignment range, all results side by side on a shared y-axis with each one's
aligned-range mean over the baseline's), expert usage, training dynamics (CE, LB, JS from the
runs' JSON logs), the Table-1-style accuracy table (tools/evaluate.py folders), significance of
each evaluation against --baseline (paired t-test over languages; McNemar and bootstrap over
items when items.jsonl is there), accuracy by checkpoint. A section without its inputs is left
out with a line saying what to run. Formats: docs/analysis.md.
"""

import argparse
import os
import sys

from sara_megatron.analysis.alignment_range import (
    DEFAULT_ALPHA,
    DEFAULT_WINDOW,
    check_range_parameters,
)
from sara_megatron.analysis.report import ReportInputs, write_report
from sara_megatron.priors import parse_layer_selection
from sara_megatron.tool_errors import report_user_error


def named_paths(values, flag, parser, must_be_dir=False) -> dict[str, str]:
    """The {name: path} of NAME=PATH values, each name once and each path existing.

    Args:
        values: The flag's values; None: none.
        flag: The flag's name, for the error message.
        parser: The parser whose `error` reports a bad value (exit 2).
        must_be_dir: Each path must be a folder, not just exist.
    """
    out = {}
    for value in values or ():
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            parser.error(f"{flag} {value!r}: expected NAME=PATH")
        if name in out:
            parser.error(f"{flag}: the name {name!r} is given twice")
        exists = os.path.isdir(path) if must_be_dir else os.path.exists(path)
        if not exists:
            parser.error(f"{flag} {name}={path}: no such {'folder' if must_be_dir else 'file'}")
        out[name] = path
    return out


def checkpoint_evaluations(values, parser) -> list[tuple[str, int, str]]:
    """The [(run, step, folder)] of --checkpoint-eval RUN:STEP=DIR values.

    Args:
        values: The flag's values; None: none.
        parser: The parser whose `error` reports a bad value (exit 2).
    """
    out = []
    for value in values or ():
        key, sep, path = value.partition("=")
        run, colon, step = key.rpartition(":")
        if not sep or not colon or not run or not step.isdigit():
            parser.error(f"--checkpoint-eval {value!r}: expected RUN:STEP=DIR")
        if not os.path.exists(path):
            parser.error(f"--checkpoint-eval {value}: no such folder")
        out.append((run, int(step), path))
    return out


def main(argv=None):
    """The `report` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for report.md and the figures")
    p.add_argument("--title", default="SARA report")
    p.add_argument("--divergence", action="append", metavar="NAME=JSON",
                   help="a tools/routing_divergence.py --json result (repeat; the first is the "
                   "baseline unless --divergence-baseline)")
    p.add_argument("--divergence-baseline", metavar="NAME")
    p.add_argument("--entropy-normalized", action="store_true",
                   help="report the entropy-normalised divergence instead of JS")
    p.add_argument("--range-alpha", type=float, default=DEFAULT_ALPHA,
                   help="alignment-range threshold, when the baseline result holds no range")
    p.add_argument("--range-window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--run", action="append", metavar="NAME=JSONL",
                   help="a training run's JSON log (logging.json_log; repeat)")
    p.add_argument("--eval", action="append", metavar="NAME=DIR",
                   help="a tools/evaluate.py output folder (repeat)")
    p.add_argument("--baseline", metavar="NAME",
                   help="the --eval every other one is tested against")
    p.add_argument("--checkpoint-eval", action="append", metavar="RUN:STEP=DIR",
                   help="the evaluation of one checkpoint of a run (repeat)")
    p.add_argument("--expert-usage", metavar="JSON",
                   help="tools/routing_divergence.py --expert-usage output")
    p.add_argument("--usage-layers", help="layers of the expert-usage heatmaps (default: first, "
                   "middle, last measured)")
    p.add_argument("--bootstrap-resamples", type=int, default=10_000)
    args = p.parse_args(argv)

    try:
        check_range_parameters(args.range_alpha, args.range_window)
    except ValueError as err:
        p.error(f"--range-alpha / --range-window: {err}")
    if args.bootstrap_resamples < 1:
        p.error("--bootstrap-resamples must be >= 1")
    inputs = ReportInputs(
        title=args.title,
        divergence=named_paths(args.divergence, "--divergence", p),
        divergence_baseline=args.divergence_baseline,
        normalized=args.entropy_normalized,
        range_alpha=args.range_alpha,
        range_window=args.range_window,
        training_logs=named_paths(args.run, "--run", p),
        evaluations=named_paths(args.eval, "--eval", p),
        baseline=args.baseline,
        checkpoint_evaluations=checkpoint_evaluations(args.checkpoint_eval, p),
        expert_usage=args.expert_usage,
        bootstrap_resamples=args.bootstrap_resamples,
    )
    if args.expert_usage and not os.path.isfile(args.expert_usage):
        p.error(f"--expert-usage {args.expert_usage}: no such file")
    if args.usage_layers:
        try:
            inputs.usage_layers = list(parse_layer_selection(args.usage_layers, 1 << 16))
        except ValueError as err:
            p.error(f"--usage-layers: {err}")
    try:
        path = write_report(inputs, args.out)
    except Exception as err:  # noqa: BLE001 - a user error is one line; anything else raises
        sys.exit(report_user_error("report.py", err, args.out))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
