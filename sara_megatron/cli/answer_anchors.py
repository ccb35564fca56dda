r"""Ask a model to answer the anchor samples (GSM8K, MMLU-ProX) over the OpenAI-compatible chat API.

    vllm serve exported-model --served-model-name qwen3-30b-a3b     # the model's own answers (-q)
    python tools/answer_anchors.py --base-url http://127.0.0.1:8000/v1 --model qwen3-30b-a3b \
        --language en --sources gsm8k,mmlu_prox --temperature 0 --max-tokens 4096 \
        --output answers_en.jsonl

    OPENAI_API_KEY=... python tools/answer_anchors.py --model gpt-5-mini \
        --reasoning-effort low --max-tokens 8192 --output answers_en.jsonl   # an external model (-g)

Each sample gets the paper's prompt (Tables 8 and 10: analyse, then the answer in \boxed{}); each
reply is appended to --output as it arrives (one JSON line: id, source, language, prompt messages,
raw output, gold, finish_reason, model, settings). A rerun of the same command after a kill asks
only for the samples not yet in the file. Samples whose request failed for good are listed in
<output>.failures.jsonl (and asked again by a rerun). Then: tools/filter_correct.py.

OPENAI_API_KEY is sent to OpenAI's API only; another --base-url gets the key of the variable named
by --api-key-env, or none. The last line on stdout is one JSON object with the counts; exit codes:
docs/reliability.md.
"""

import argparse
import asyncio
import json
import os
import sys

from sara_megatron.construction.answering import answer_samples, failures_path_for
from sara_megatron.construction.sources import (
    MMLU_PROX_DEFAULT_SPLIT,
    load_anchor_samples,
    parse_sources,
)
from sara_megatron.tool_errors import InputError, report_user_error


def parse_args(argv=None):
    """The checked command line, with `settings` (the `ChatSettings` of every request) and
    `loaded_templates` (None without --templates) added.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(prog="answer_anchors", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="answers JSONL file (appended to; resumed)")
    p.add_argument("--model", required=True, help="model name the server knows")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                      "(vLLM); default: OpenAI")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="the environment variable holding the key for --base-url (its name, never "
                        "the key); without it only OpenAI's API gets a key (OPENAI_API_KEY)")
    p.add_argument("--language", default="en", help="anchor language: en or zh (default en)")
    p.add_argument("--sources", default="gsm8k,mmlu_prox", help="comma-separated: gsm8k, mmlu_prox")
    p.add_argument("--data-dir", help="read sources from local JSONL files in the hub's columns "
                                      "(DIR/gsm8k/train.jsonl, DIR/mmlu_prox/<lang>.jsonl)")
    p.add_argument("--mmlu-prox-split", default=MMLU_PROX_DEFAULT_SPLIT,
                   help="MMLU-ProX split on the hub (default: test, its 11,829 questions)")
    p.add_argument("--limit", type=int, help="the first N samples of each source")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-tokens", type=int, help="completion token limit (max_completion_tokens "
                                                  "for GPT-5-family models)")
    p.add_argument("--seed", type=int)
    p.add_argument("--reasoning-effort", choices=("minimal", "low", "medium", "high"),
                   help="for reasoning models (GPT-5 family, o-series)")
    p.add_argument("--extra-body", metavar="JSON",
                   help="a JSON object merged into each request body, e.g. for vLLM "
                        "'{\"chat_template_kwargs\": {\"enable_thinking\": false}}'")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--template-language", default="en",
                   help="language of the prompt template (default en; others need --templates)")
    p.add_argument("--templates", help="JSON file of translated templates (sara_megatron.prompts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from sara_megatron.chat import ChatSettings
    from sara_megatron.chat.client import check_api_key_env
    from sara_megatron.data.languages import known_languages

    if args.language not in known_languages():
        p.error(f"--language: unknown language code {args.language!r}")
    try:
        args.sources = parse_sources(args.sources)
    except ValueError as e:
        p.error(f"--sources: {e}")
    for flag in ("concurrency", "max_tokens", "limit"):  # --limit 0 would answer nothing
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.max_retries < 0:
        p.error(f"--max-retries must be >= 0, got {args.max_retries}")
    try:
        check_api_key_env(args.base_url, args.api_key_env)
    except ValueError as e:
        p.error(str(e))
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such directory")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        p.error(f"--output: no such directory {folder}")
    extra_body = None
    if args.extra_body is not None:
        try:
            extra_body = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            p.error(f"--extra-body: not JSON ({e.msg})")
        if not isinstance(extra_body, dict):
            p.error("--extra-body must be a JSON object")
    try:
        args.settings = ChatSettings(model=args.model, temperature=args.temperature, top_p=args.top_p,
                                     max_tokens=args.max_tokens, seed=args.seed,
                                     reasoning_effort=args.reasoning_effort, extra_body=extra_body)
    except ValueError as e:
        p.error(str(e))
    args.loaded_templates = None
    if args.templates:
        from sara_megatron.prompts import load_templates

        try:
            args.loaded_templates = load_templates(args.templates)
        except (OSError, ValueError) as e:
            p.error(f"--templates: {e}")
    elif args.template_language != "en":
        p.error("--template-language other than en needs --templates (the project ships English)")
    return args


async def run(args, samples, client):
    """Answer the samples with a progress bar, then close the client.

    Args:
        args: The parsed command line.
        samples: The anchor samples to answer.
        client: The `ChatClient` the requests go through.

    Returns:
        `answer_samples`' `AnswerRunReport`.
    """
    from sara_megatron.jobs import ProgressBar

    bar = ProgressBar("answer_anchors", "sample", len(samples), enabled=not args.no_progress,
                      postfix=lambda c: dict(done=c.skipped + c.done, resumed=c.skipped,
                                             failed=c.failed, retries=client.stats.retries))
    try:
        return await answer_samples(samples, client, args.settings, args.output,
                                    template_language=args.template_language,
                                    templates=args.loaded_templates, on_progress=bar)
    finally:
        bar.close()
        await client.aclose()


def main(argv=None) -> int:
    """The `answer_anchors` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    try:
        samples = []
        for source in args.sources:
            samples += load_anchor_samples(source, args.language, args.data_dir, args.limit,
                                           mmlu_prox_split=args.mmlu_prox_split)
    except FileNotFoundError as e:  # a source file --data-dir lacks
        return report_user_error("answer_anchors", InputError(str(e)))
    except Exception as e:  # noqa: BLE001 - bad source data is one line; anything else raises
        return report_user_error("answer_anchors", e)
    from sara_megatron.chat import ChatClient

    try:
        client = ChatClient(args.base_url, api_key_env=args.api_key_env, concurrency=args.concurrency,
                            max_retries=args.max_retries, timeout_s=args.timeout_s)
    except Exception as e:  # noqa: BLE001 - no API key for OpenAI itself: one line
        return report_user_error("answer_anchors", e)
    try:
        report = asyncio.run(run(args, samples, client))
    except Exception as e:  # noqa: BLE001 - an answers file this run cannot continue: one line
        return report_user_error("answer_anchors", e, args.output)
    summary = report.as_dict()
    print(f"answer_anchors: {report.answered} answered, {report.already_done} already in "
          f"{args.output}, {report.failed} failed", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    problem = report.request_failures_line(failures_path_for(args.output))
    if problem is not None:  # exit 1: the answers file is not complete
        print(f"answer_anchors: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
