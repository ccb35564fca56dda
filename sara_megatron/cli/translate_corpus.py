"""Translate an anchor-language corpus into target languages with any OpenAI-compatible model.

    python tools/translate_corpus.py --input anchors.jsonl --languages hi,ne,bn,te,sw \\
        --output corpus/ --model gpt-5-mini [--base-url URL] [--cache corpus/translations.sqlite] \\
        [--concurrency 16] [--max-retries 6] [--dry-run] [--max-cost-usd X] [--batch]

--output becomes a parallel corpus: <lang>.jsonl for the anchor language and each target (ids,
sources and answers of the anchor, roles kept, contents translated) and translation_failures.jsonl
(id, language, reason) for what did not pass the checks. The folder is the tool's: a non-empty
one it did not make from the same input and settings (translation_plan.json) is refused. Every
reply is cached (SQLite) as it arrives: a rerun of the same command after a crash or kill
requests only what is missing. The last stdout line is a JSON summary; the run exits 1 when a
pair's requests failed or a language's rejected share passed --max-rejected-fraction. OPENAI_API_KEY is sent to OpenAI's API only; another --base-url
gets the key of the variable named by --api-key-env, or none. Rules, formats and exit codes:
docs/construction.md, docs/reliability.md.
"""

import argparse
import json
import os
import sys

from sara_megatron.chat.client import check_api_key_env, is_reasoning_model
from sara_megatron.construction.translation import TranslationConfig
from sara_megatron.construction.translation_run import run_translation
from sara_megatron.tool_errors import exit_on_interrupt, report_user_error


def parse_args(argv=None):
    """The parser and the checked command line, with `language_list` (the target languages,
    deduplicated in order) added.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Returns:
        (parser, args).

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(prog="translate_corpus", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="anchor-language corpus (JSONL, one language)")
    p.add_argument("--languages", required=True, help="target language codes, comma-separated")
    p.add_argument("--output", required=True, help="output folder of the parallel corpus")
    p.add_argument("--model", required=True, help="e.g. gpt-5-mini, or the model a vLLM server serves")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: OpenAI's API)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="the environment variable holding the key for --base-url (its name, never "
                        "the key); without it only OpenAI's API gets a key (OPENAI_API_KEY)")
    p.add_argument("--cache", help="reply cache (default: <output>/translations.sqlite)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries of a failed request, and of a reply that failed a check")
    p.add_argument("--max-rejected-fraction", type=float, default=0.05,
                   help="per target language: the share of pairs the translation checks may reject "
                        "before the run fails (exit 1); default 0.05")
    p.add_argument("--dry-run", action="store_true",
                   help="print the number of requests and the estimated cost; send nothing")
    p.add_argument("--max-cost-usd", type=float,
                   help="stop before the estimated cost of this run passes this")
    p.add_argument("--batch", action="store_true", help="use the Batch API (half the price, slower)")
    p.add_argument("--batch-poll-s", type=float, default=30.0, help="seconds between batch polls")
    p.add_argument("--prices", help="JSON file of USD per million tokens, "
                                    '{"model": {"input": x, "output": y}}, over the built-in table')
    p.add_argument("--split-messages", action="store_true",
                   help="one plain-text request per message instead of one per interaction")
    p.add_argument("--structured-output", action="store_true",
                   help="ask for a JSON-schema response_format (the reply is parsed the same without)")
    p.add_argument("--temperature", type=float, help="not for GPT-5-family / o-series models")
    p.add_argument("--top-p", type=float, help="not for GPT-5-family / o-series models")
    p.add_argument("--max-tokens", type=int,
                   help="reply limit (max_completion_tokens for reasoning models)")
    p.add_argument("--reasoning-effort", help="reasoning models (default there: low)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--max-context-tokens", type=int,
                   help="tokens a request may hold, prompt + expected reply, estimated at 4 UTF-8 "
                        "bytes a token (default: the model's context window, 32768 for a model "
                        "not in the built-in table); a run with a longer sample is refused before "
                        "any request, --dry-run counts them")
    p.add_argument("--extra-languages", nargs="*", default=[],
                   help="language codes beyond en zh hi ne bn te sw")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    args.language_list = tuple(dict.fromkeys(c.strip() for c in args.languages.split(",") if c.strip()))
    if not args.language_list:
        p.error("--languages: give at least one target language code")
    if not os.path.isfile(args.input):
        p.error(f"--input: no such file: {args.input}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        p.error(f"--output: {args.output} is a file, not a folder")
    for flag in ("concurrency",):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_retries < 0:
        p.error(f"--max-retries must be >= 0, got {args.max_retries}")
    if not 0.0 <= args.max_rejected_fraction <= 1.0:
        p.error(f"--max-rejected-fraction must be between 0 and 1, got {args.max_rejected_fraction}")
    if args.max_context_tokens is not None and args.max_context_tokens < 1:
        p.error(f"--max-context-tokens must be >= 1, got {args.max_context_tokens}")
    if args.max_cost_usd is not None and args.max_cost_usd <= 0:
        p.error(f"--max-cost-usd must be > 0, got {args.max_cost_usd}")
    if is_reasoning_model(args.model) and (args.temperature is not None or args.top_p is not None):
        p.error(f"--temperature/--top-p: {args.model} accepts only the default temperature "
                "(GPT-5 family / o-series); use --reasoning-effort")
    if args.prices is not None and not os.path.isfile(args.prices):
        p.error(f"--prices: no such file: {args.prices}")
    try:
        check_api_key_env(args.base_url, args.api_key_env)
    except ValueError as e:
        p.error(str(e))
    return p, args


def main(argv=None):
    """The `translate_corpus` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    parser, args = parse_args(argv)
    config = TranslationConfig(
        input_path=args.input, output_dir=args.output, languages=args.language_list,
        model=args.model, base_url=args.base_url, cache_path=args.cache,
        concurrency=args.concurrency, max_retries=args.max_retries, dry_run=args.dry_run,
        max_cost_usd=args.max_cost_usd, batch=args.batch, split_messages=args.split_messages,
        structured_output=args.structured_output, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, reasoning_effort=args.reasoning_effort,
        seed=args.seed, prices_path=args.prices, timeout_s=args.timeout_s,
        batch_poll_s=args.batch_poll_s, extra_languages=tuple(args.extra_languages),
        progress=not args.no_progress, api_key_env=args.api_key_env,
        max_rejected_fraction=args.max_rejected_fraction,
        max_context_tokens=args.max_context_tokens,
    )
    try:
        with exit_on_interrupt(parser.prog):  # every reply is cached: the same command resumes
            summary = run_translation(config)
    except Exception as e:  # noqa: BLE001 - bad input, language codes, price file, missing key,
        # a folder not ours: one line (no usage: it is no flag error); anything else raises
        sys.exit(report_user_error(parser.prog, e, args.output))
    print(json.dumps(summary), flush=True)
    # Exit 1: the corpus is written, but the run did not do all its work.
    problems = summary.get("problems", [])
    for problem in problems:
        print(f"{parser.prog}: {problem}", file=sys.stderr)
    if summary.get("stopped"):
        print(f"{parser.prog}: stopped before --max-cost-usd {args.max_cost_usd} was passed; "
              "rerun with a higher limit to go on (the cache keeps what was paid for)", file=sys.stderr)
    if problems or summary.get("stopped"):
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
