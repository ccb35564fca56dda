"""Is the treatment better than the baseline? The paper's paired t-test over languages (Appendix A.4).

    python tools/significance.py --treatment results/sara/results.json \\
        --baseline results/fft/results.json --benchmark global_mmlu [--languages hi,ne,bn,te,sw,en] --json
    python tools/significance.py --treatment-scores 83.44,80.89,83.67,77.44,77.89,95.22 \\
        --baseline-scores 82.22,82.00,84.11,76.56,77.78,95.00 --json

Paired over languages (each language's mean accuracy), H1: treatment > baseline, df = n - 1.
p_one_tailed is the p-value of that one-tailed test; p_two_tailed is the two-tailed one. (The
paper's Table 6 prints the two-tailed p-values under a "one-tailed" heading: for Qwen3
Global-MMLU t = 4.0784, two-tailed p = 0.0096, one-tailed p = 0.0048.)

When both results folders also hold items.jsonl with the same items, an item-level comparison is
added: an exact McNemar test over the pooled items (one run) and a paired bootstrap interval of
the accuracy difference (items resampled) - far more power than a handful of language means.
"""

import argparse
import json
import math
import os
import sys

from sara_megatron.evaluation.benchmarks import BENCHMARK_LANGUAGES
from sara_megatron.evaluation.significance import paired_t_test
from sara_megatron.evaluation.significance_files import (
    ComparisonError,
    compare_results,
    finite_or_null,
    format_significance,
)


def parse_scores(text: str, flag: str, parser) -> list[float]:
    """The finite numbers of a comma-separated list; the parser's error (exit 2) otherwise.

    Args:
        text: E.g. "41.2,38.0,40.5".
        flag: The flag's name, for the error message.
        parser: The parser whose `error` reports a bad value.
    """
    try:
        scores = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{flag}: comma-separated numbers expected, got {text!r}")
    if not all(math.isfinite(s) for s in scores):
        parser.error(f"{flag}: scores must be finite numbers")
    return scores


def parse_args(argv=None):
    """The checked command line: either results files (--treatment, --baseline, --benchmark) or
    paired scores (parsed into lists of floats), with `parser` added.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--treatment", help="the treatment's results.json (or its folder)")
    p.add_argument("--baseline", help="the baseline's results.json (or its folder)")
    p.add_argument("--benchmark", choices=sorted(BENCHMARK_LANGUAGES),
                   help="which benchmark of the results files to compare")
    p.add_argument("--languages", help="comma-separated; default: every language both files have")
    p.add_argument("--treatment-scores", help="comma-separated per-language scores")
    p.add_argument("--baseline-scores", help="comma-separated, in the same language order")
    p.add_argument("--bootstrap-resamples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    from_files = args.treatment is not None or args.baseline is not None
    from_scores = args.treatment_scores is not None or args.baseline_scores is not None
    if from_files == from_scores:
        p.error("give either --treatment and --baseline (results files) or --treatment-scores "
                "and --baseline-scores")
    if from_files:
        if args.treatment is None or args.baseline is None or args.benchmark is None:
            p.error("--treatment, --baseline and --benchmark go together")
        for flag in ("treatment", "baseline"):
            if not os.path.exists(getattr(args, flag)):
                p.error(f"--{flag}: no such file or folder: {getattr(args, flag)}")
    else:
        if args.treatment_scores is None or args.baseline_scores is None:
            p.error("--treatment-scores and --baseline-scores go together")
        args.treatment_scores = parse_scores(args.treatment_scores, "--treatment-scores", p)
        args.baseline_scores = parse_scores(args.baseline_scores, "--baseline-scores", p)
        if len(args.treatment_scores) != len(args.baseline_scores):
            p.error(f"{len(args.treatment_scores)} treatment scores but "
                    f"{len(args.baseline_scores)} baseline scores")
        if len(args.treatment_scores) < 2:
            p.error("a paired t-test needs at least 2 pairs of scores")
    if args.bootstrap_resamples < 1:
        p.error("--bootstrap-resamples must be >= 1")
    args.parser = p
    return args


def main(argv=None) -> int:
    """The `significance` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    if args.treatment_scores is not None:
        result = paired_t_test(args.treatment_scores, args.baseline_scores)
    else:
        languages = ([x.strip() for x in args.languages.split(",") if x.strip()]
                     if args.languages else None)
        try:
            result = compare_results(
                args.treatment, args.baseline, args.benchmark, languages,
                resamples=args.bootstrap_resamples, seed=args.seed,
                note=lambda text: print(f"significance: note: {text}", file=sys.stderr))
        except ComparisonError as e:
            args.parser.error(str(e))
    if args.json:
        print(json.dumps(finite_or_null(result)))
    else:
        print(format_significance(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
