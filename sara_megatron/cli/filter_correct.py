r"""Keep the anchor samples the model answered correctly, as parallel-corpus records.

    python tools/filter_correct.py --input answers.jsonl --output anchors.jsonl \
        [--dropped anchors.dropped.jsonl] \
        [--decontaminate-against global_mmlu,belebele,mgsm [--benchmark-data-dir DIR]]

Reads the answers of tools/answer_anchors.py and writes the samples whose last \boxed{} equals the
gold answer (and whose reply was not cut by the length limit) as corpus records of the anchor
language: user = the prompt, assistant = the verified reply, answer = gold. tools/shard_corpus.py
and tools/translate_corpus.py take the output as it is. Every dropped sample is listed, with its
reason (contaminated, truncated, no_boxed, wrong, duplicate), in the --dropped side file.

--decontaminate-against drops samples whose question shares a 13-gram of normalised words with a
question of those benchmarks in the anchor language (from the hub, or --benchmark-data-dir in the
hub's columns: DIR/<benchmark>/<lang>.jsonl).

The summary (stderr) gives the kept share per source; the last line on stdout is one JSON object
with the counts.
"""

import argparse
import json
import os
import sys

from sara_megatron.construction.decontamination import build_index, parse_benchmarks
from sara_megatron.construction.filtering import filter_answers, read_answer_records
from sara_megatron.io import atomic_open
from sara_megatron.tool_errors import InputError, report_user_error


def parse_args(argv=None):
    """The checked command line, with `benchmarks` (those to decontaminate against) and
    `dropped` (default: the output's stem + .dropped.jsonl) set.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(prog="filter_correct", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="answers JSONL file(s)")
    p.add_argument("--output", required=True, help="corpus JSONL file of the kept samples")
    p.add_argument("--dropped", help="side file listing each dropped sample and its reason "
                                     "(default: <output without .jsonl>.dropped.jsonl)")
    p.add_argument("--decontaminate-against", metavar="BENCHMARKS",
                   help="comma-separated: global_mmlu, belebele, mgsm")
    p.add_argument("--benchmark-data-dir",
                   help="read the benchmarks from DIR/<benchmark>/<lang>.jsonl instead of the hub")
    p.add_argument("--max-rejected-fraction", type=float, default=0.05,
                   help="per source: the share of replies that cannot be judged (truncated, no "
                        "\\boxed{}) before the run fails (exit 1); default 0.05")
    args = p.parse_args(argv)
    if not 0.0 <= args.max_rejected_fraction <= 1.0:
        p.error(f"--max-rejected-fraction must be between 0 and 1, got {args.max_rejected_fraction}")
    missing = [path for path in args.input if not os.path.isfile(path)]
    if missing:
        p.error(f"--input: no such file: {', '.join(missing)}")
    if args.decontaminate_against is not None:
        try:
            args.benchmarks = parse_benchmarks(args.decontaminate_against)
        except ValueError as e:
            p.error(f"--decontaminate-against: {e}")
    else:
        args.benchmarks = ()
        if args.benchmark_data_dir:
            p.error("--benchmark-data-dir needs --decontaminate-against")
    if args.benchmark_data_dir and not os.path.isdir(args.benchmark_data_dir):
        p.error(f"--benchmark-data-dir {args.benchmark_data_dir}: no such directory")
    if args.dropped is None:
        stem = args.output[:-len(".jsonl")] if args.output.endswith(".jsonl") else args.output
        args.dropped = stem + ".dropped.jsonl"
    for path in (args.output, args.dropped):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            p.error(f"no such directory for {path}: {folder}")
    if os.path.abspath(args.output) in map(os.path.abspath, args.input):
        p.error("--output must not be an --input file")
    return args


def write_jsonl(path: str, rows) -> None:
    """Write the rows as JSON lines, atomically.

    Args:
        path: The file to write.
        rows: JSON-ready objects, one a line.
    """
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    """The `filter_correct` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    try:
        index = None
        if args.benchmarks:
            # A first pass for the languages only: the answers are streamed, not held twice.
            languages = {r["language"] for r in read_answer_records(args.input)}
            index, notes = build_index(args.benchmarks, languages, data_dir=args.benchmark_data_dir)
            for note in notes:
                print(f"filter_correct: {note}", file=sys.stderr)
        result = filter_answers(read_answer_records(args.input), contamination=index)
    except FileNotFoundError as e:  # a benchmark file --benchmark-data-dir lacks
        return report_user_error("filter_correct", InputError(str(e)))
    except Exception as e:  # noqa: BLE001 - bad input data is one line; anything else raises
        return report_user_error("filter_correct", e)
    if not result.counts:
        return report_user_error("filter_correct", InputError(
            f"no answer records in {', '.join(args.input)}: nothing to filter"))
    write_jsonl(args.output, result.kept)
    write_jsonl(args.dropped, result.dropped)
    summary = result.summary()
    if index is not None:
        summary["decontamination"] = {
            "benchmarks": list(args.benchmarks),
            "benchmark_questions": {f"{b}/{lang}": n for (b, lang), n in sorted(index.questions.items())},
            "dropped_by_source": {s: c["dropped"]["contaminated"]
                                  for s, c in summary["by_source"].items()},
        }
    print(result.format_summary(), file=sys.stderr)
    print(f"filter_correct: wrote {len(result.kept)} records to {args.output}, "
          f"{len(result.dropped)} dropped to {args.dropped}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    problems = result.problems(args.max_rejected_fraction)
    for problem in problems:  # exit 1: the outputs are written, but fell short
        print(f"filter_correct: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
