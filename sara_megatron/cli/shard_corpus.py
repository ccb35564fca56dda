"""Parallel corpus (JSONL) -> Megatron indexed token shards per language, with sample metadata.

    python tools/shard_corpus.py --corpus data/parallel/ --tokenizer /models/Qwen3-30B-A3B \
        --output data/shards --anchor-language en --seq-length 4096 --workers 8

Bad records are skipped and counted (by file and line, in <output>/corpus_issues.jsonl);
--strict stops at the first. A rerun after a kill resumes; the output is byte-identical whatever
--workers. The corpus format is described in the README ("Parallel corpus format").
"""

import argparse
import os
import sys

from sara_megatron.data.chat_tokenization import check_seq_length
from sara_megatron.data.corpus_sharding import ShardingConfig, ShardProgress, shard_corpus
from sara_megatron.tool_errors import InputError, check_writable_output, report_user_error

TOOL = "shard_corpus.py"  # as argparse names it from `tools/shard_corpus.py` or `-m`


def parse_args(argv=None):
    """The checked command line (sequence length, sizes, the corpus paths, a writable output).

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True,
                   help="JSONL files, or directories of *.jsonl files")
    p.add_argument("--tokenizer", required=True,
                   help="the model's HF tokenizer: a folder, or a hub id in the local HF cache")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a --tokenizer hub id missing from the local HF cache")
    p.add_argument("--output", required=True, help="output directory for the shards")
    p.add_argument("--anchor-language", default="en")
    p.add_argument("--seq-length", type=int, default=4096,
                   help="sequences longer than this are truncated (and counted)")
    p.add_argument("--shard-size", type=int, default=2048, help="samples per shard")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    p.add_argument("--duplicates", choices=("reject", "first", "last"), default="reject",
                   help="records of one (id, lang) that differ: reject every copy and report "
                        "them (default), or keep the first / last in file order. Identical "
                        "copies are dropped and counted either way")
    p.add_argument("--extra-languages", nargs="*", default=[],
                   help="language codes beyond en zh hi ne bn te sw")
    p.add_argument("--chat-template", help="a Jinja chat template file replacing the tokenizer's")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    try:
        check_seq_length(args.seq_length)
    except ValueError as e:
        p.error(f"--seq-length: {e}")  # exits 2, like any other bad argument
    for flag in ("shard_size", "workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    missing = [path for path in args.corpus if not os.path.exists(path)]
    if missing:
        p.error(f"--corpus: no such file or folder: {', '.join(missing)}")
    try:
        check_writable_output(args.output, "--output")
    except OSError as err:
        p.error(str(err.strerror or err))
    return args


def print_progress(p: ShardProgress) -> None:
    """Print one progress line to stderr: shards done, what this run wrote, the rate and an ETA.

    Args:
        p: The sharder's progress.
    """
    rate = p.tokens_written / max(p.elapsed_s, 1e-9)
    remaining = p.shards_total - p.shards_done
    new_done = p.shards_done - p.resumed
    eta = p.elapsed_s / max(new_done, 1) * remaining
    print(f"shard_corpus: {p.shards_done}/{p.shards_total} shards ({p.last_prefix}), "
          f"{p.samples_written} samples / {p.tokens_written} tokens this run, "
          f"{rate:,.0f} tokens/s, eta {eta:.0f}s", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """The `shard_corpus` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    config = ShardingConfig(
        corpus_paths=tuple(args.corpus),
        output_dir=args.output,
        tokenizer=args.tokenizer,
        anchor_language=args.anchor_language,
        seq_length=args.seq_length,
        shard_size=args.shard_size,
        workers=args.workers,
        strict=args.strict,
        duplicates=args.duplicates,
        extra_languages=tuple(args.extra_languages),
        chat_template_path=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download,
    )
    try:
        report = shard_corpus(config, progress=print_progress)
    except FileNotFoundError as e:  # a --chat-template or tokenizer file that is not there
        return report_user_error(TOOL, InputError(str(e)), args.output)
    except Exception as e:  # noqa: BLE001 - a bad record under --strict, a folder of another
        # run, a language with nothing left, a full disk: one line; anything else raises
        return report_user_error(TOOL, e, args.output)
    print(report.corpus.format_summary())
    for lang, info in report.manifest["languages"].items():
        print(f"  {lang}: {info['samples']} samples, {info['tokens']} tokens, "
              f"{len(info['shards'])} shard(s), truncated to {config.seq_length}: "
              f"{info['truncated']}, no response tokens left: {info['no_response_tokens']}")
    rate = report.tokens_written / max(report.writing_s, 1e-9)
    print(f"shard_corpus: wrote {report.shards_written} shard(s), resumed {report.shards_resumed}, "
          f"{report.tokens_written} tokens in {report.elapsed_s:.1f}s ({rate:,.0f} tokens/s "
          f"tokenizing and writing) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
