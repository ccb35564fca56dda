"""Evaluate a model as the paper did: Global-MMLU, BELEBELE and MGSM with its \\boxed{} prompts.

    python tools/evaluate.py --benchmarks global_mmlu,belebele,mgsm --languages hi,ne,bn,te,sw,en \\
        --backend openai --base-url http://127.0.0.1:8000/v1 --model sara \\
        [--data-dir DIR] [--runs 3] [--limit N] [--concurrency 32] --output results/sara

    python tools/evaluate.py --benchmarks mgsm --languages en,sw --backend hf --model-dir export/ \\
        --output results/tiny

--backend openai talks to any OpenAI-compatible server (`vllm serve <export dir> --served-model-name
sara` is the expected one), which applies the model's chat template; --backend hf runs
transformers in-process (--batch-size items of a language at a time). Temperature 0.1, top-p 1, --runs runs with their own seeds; accuracy in
percent, mean and sample std (ddof 1). Writes results.json, items.jsonl and table.md into
--output; a rerun with the same --output resumes, asking only unanswered items, and refuses a
folder that holds another model's answers or answers to other benchmark data (their fingerprints
are recorded; --restart starts the folder over). A request that fails after its retries is never
scored: the tool exits 1 and a rerun resumes.

A ShifCon run's export carries its shift (shifcon.json, docs/objectives.md): --backend hf applies
it, each item shifted by its language as in training. A server cannot apply it (stock vLLM has no
such hook): --backend openai with --model-revision naming a ShifCon export is refused unless
--no-shift says to evaluate the model unshifted; --no-shift does the same with --backend hf.
"""

import argparse
import asyncio
import json
import os
import sys

from sara_megatron.evaluation.backends import DEFAULT_MAX_PROMPT_CHARS
from sara_megatron.evaluation.benchmarks import BENCHMARK_LANGUAGES
from sara_megatron.evaluation.model_identity import (
    check_hf_model_folder, hf_model_fingerprint, served_model_fingerprint,
)
from sara_megatron.evaluation.runner import (
    PROTOCOLS, EvaluationIncomplete, EvaluationPlan, EvaluationRunner, run_seed,
)
from sara_megatron.io import sha256_file
from sara_megatron.prompts import PROMPT_VERSION, load_templates
from sara_megatron.tool_errors import InputError, exit_on_interrupt, report_user_error


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated list.

    Args:
        text: E.g. "hi, ne,bn".
    """
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    """The checked command line: benchmarks and languages as lists, --chat-template-kwargs
    parsed, `templates_data` (None without --templates) and `parser` added; with the
    loglikelihood protocol, runs set to 1.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--benchmarks", default="global_mmlu,belebele,mgsm",
                   help="comma-separated: global_mmlu, belebele, mgsm")
    p.add_argument("--languages", default="hi,ne,bn,te,sw,en",
                   help="comma-separated; a language a benchmark lacks is skipped with a note")
    p.add_argument("--backend", choices=("openai", "hf"), required=True)
    p.add_argument("--base-url", help="openai: the server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="openai: the served model name")
    p.add_argument("--model-revision",
                   help="openai: what the served weights are (a checkpoint path, a commit, a tag); "
                        "recorded with the served name so that a resume against another model "
                        "served under the same name is refused")
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS,
                   help="openai: an item whose prompt has more characters is refused before any "
                        "request (the served model's tokenizer is not here to count tokens)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai: the environment variable holding the key (none needed for vLLM)")
    p.add_argument("--model-dir", help="hf: an HF model folder (an exported checkpoint)")
    p.add_argument("--dtype", default="auto", help="hf: auto, float32, bfloat16 or float16")
    p.add_argument("--device", help="hf: cuda or cpu (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="hf: allow the model's code")
    p.add_argument("--max-context-tokens", type=int,
                   help="hf: the model's context in tokens (default: max_position_embeddings of "
                        "its config.json); prompt tokens + --max-new-tokens must fit, else the "
                        "item is refused before any forward")
    p.add_argument("--batch-size", type=int, default=1,
                   help="hf: items of one language generated together (the replies do not "
                        "depend on it: each item samples with its own seed)")
    p.add_argument("--no-shift", action="store_true",
                   help="evaluate a ShifCon export without its per-language shift (outside the "
                        "regime it was trained in); needed to evaluate one through a server")
    p.add_argument("--data-dir", help="read DIR/<benchmark>/<lang>.jsonl instead of the hub")
    p.add_argument("--output", required=True, help="folder for results.json, items.jsonl, table.md")
    p.add_argument("--restart", action="store_true",
                   help="discard the answers already in --output and evaluate from the start")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="run r uses seed + r - 1")
    p.add_argument("--limit", type=int, help="the first N items of each benchmark and language")
    p.add_argument("--concurrency", type=int, default=32, help="openai: requests in flight")
    p.add_argument("--max-retries", type=int, default=6, help="openai: retries per request")
    p.add_argument("--timeout-s", type=float, default=600.0, help="openai: per request")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int,
                   help="default: the model's own (generation_config.json), as vLLM does")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--template-language", choices=("en", "native"), default="en",
                   help="en: the paper's English templates; native: each language's translation "
                        "from --templates")
    p.add_argument("--templates", help="JSON file of translated templates (see docs/evaluation.md)")
    p.add_argument("--chat-template-kwargs",
                   help='JSON object for the chat template, e.g. \'{"enable_thinking": false}\' '
                        "(default: the model's own behaviour)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="generate",
                   help="generate: the paper's (\\boxed{} answers); loglikelihood: lm-eval's usual "
                        "multiple-choice scoring (the option letter's log-likelihood; hf backend, "
                        "Global-MMLU and BELEBELE, one run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    args.benchmarks = comma_list(args.benchmarks)
    unknown = [b for b in args.benchmarks if b not in BENCHMARK_LANGUAGES]
    if unknown or not args.benchmarks:
        p.error(f"--benchmarks: unknown {', '.join(unknown) or '(none given)'} "
                f"(known: {', '.join(BENCHMARK_LANGUAGES)})")
    args.languages = comma_list(args.languages)
    known = {lang for langs in BENCHMARK_LANGUAGES.values() for lang in langs}
    unknown = [lang for lang in args.languages if lang not in known]
    if unknown or not args.languages:
        p.error(f"--languages: unknown {', '.join(unknown) or '(none given)'} "
                f"(known: {' '.join(sorted(known))})")
    if args.backend == "openai":
        if not args.base_url or not args.model:
            p.error("--backend openai needs --base-url and --model")
        if args.protocol == "loglikelihood":
            p.error("--protocol loglikelihood needs --backend hf (scoring over a completions "
                    "endpoint with logprobs is not built)")
    else:
        if not args.model_dir:
            p.error("--backend hf needs --model-dir")
        if not os.path.isdir(args.model_dir):
            p.error(f"--model-dir: no such folder: {args.model_dir}")
    for flag in ("runs", "concurrency", "max_new_tokens", "max_prompt_chars", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_context_tokens is not None and args.max_context_tokens < 1:
        p.error(f"--max-context-tokens must be >= 1, got {args.max_context_tokens}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if args.max_retries < 0:
        p.error("--max-retries must be >= 0")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir: no such folder: {args.data_dir}")
    if args.chat_template_kwargs:
        try:
            args.chat_template_kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--chat-template-kwargs: not JSON: {e}")
        if not isinstance(args.chat_template_kwargs, dict):
            p.error("--chat-template-kwargs must be a JSON object")
    args.templates_data = None
    if args.templates:
        try:
            args.templates_data = load_templates(args.templates)
        except (OSError, ValueError) as e:
            p.error(f"--templates: {e}")
    if args.template_language == "native" and args.templates_data is None:
        p.error("--template-language native needs --templates FILE (the project ships English)")
    if args.protocol == "loglikelihood" and args.runs != 1:
        print("evaluate: --protocol loglikelihood is deterministic: one run", file=sys.stderr)
        args.runs = 1
    args.parser = p
    return args


def shift_of(args):
    """The ShifCon shift to apply (`sara.language_shift.LanguageShift`) or None; records in
    `args.shifcon_shift` what is done ("applied", "not applied (--no-shift)" or None: not a
    ShifCon model).

    Args:
        args: The parsed command line (its --model-dir, or --model-revision when served).

    Raises:
        InputError: A served ShifCon export without --no-shift, or one without vectors for an
            evaluated language.
    """
    from sara_megatron.sara.language_shift import has_shift_sidecar, read_shift_sidecar

    folder = args.model_dir if args.backend == "hf" else args.model_revision
    args.shifcon_shift = None
    if not folder or not os.path.isdir(folder) or not has_shift_sidecar(folder):
        return None
    if args.no_shift:
        args.shifcon_shift = "not applied (--no-shift)"
        return None
    if args.backend == "openai":
        raise InputError(f"{folder} is a ShifCon export: its hidden states are shifted per "
                         "language, which a server (stock vLLM) cannot do; evaluate it with "
                         "--backend hf, or pass --no-shift to evaluate it unshifted")
    shift = read_shift_sidecar(folder)
    missing = [lang for lang in args.languages
               if lang != shift.anchor_language and lang not in shift.languages]
    if missing:
        raise InputError(f"{folder} is a ShifCon export with language vectors of "
                         f"{', '.join(shift.languages)}: none for {', '.join(missing)}; leave "
                         "those out of --languages, or pass --no-shift")
    args.shifcon_shift = "applied"
    print(f"evaluate: {shift.describe()} (per item's language; --no-shift: none)",
          file=sys.stderr)
    return shift


def settings_of(args) -> dict:
    """What results.json records; the model fingerprint and ANSWER_SETTINGS among them must match
    for a resume.

    Args:
        args: The parsed command line, after `shift_of`.
    """
    if args.backend == "openai":
        model = args.model
        fingerprint = served_model_fingerprint(args.model, args.model_revision)
    else:
        model = os.path.basename(os.path.normpath(args.model_dir))
        fingerprint = hf_model_fingerprint(args.model_dir)
    return {
        "backend": args.backend, "model": model, "model_fingerprint": fingerprint,
        "model_revision": args.model_revision,
        "base_url": args.base_url, "model_dir": args.model_dir,
        "protocol": args.protocol, "benchmarks": args.benchmarks, "languages": args.languages,
        "runs": args.runs, "seed": args.seed,
        "run_seeds": [run_seed(args.seed, r) for r in range(1, args.runs + 1)],
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens, "limit": args.limit, "data_dir": args.data_dir,
        "template_language": args.template_language,
        "templates_sha256": sha256_file(args.templates) if args.templates else None,
        "prompt_version": PROMPT_VERSION,
        "chat_template_kwargs": args.chat_template_kwargs or None,
        "shifcon_shift": getattr(args, "shifcon_shift", None),
        "accuracy": "percent; std is the sample standard deviation (ddof 1) over runs",
    }


def build_backend(args, shift=None):
    """The backend the command line names: `OpenAIBackend` or `HFBackend`.

    Args:
        args: The parsed command line.
        shift: The ShifCon shift for the in-process backend (`shift_of`); None: none.
    """
    from sara_megatron.evaluation.backends import HFBackend, OpenAIBackend, SamplingSettings

    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens)
    if args.backend == "openai":
        return OpenAIBackend(args.base_url, args.model, sampling, concurrency=args.concurrency,
                             chat_template_kwargs=args.chat_template_kwargs,
                             max_retries=args.max_retries, timeout_s=args.timeout_s,
                             api_key_env=args.api_key_env, max_prompt_chars=args.max_prompt_chars)
    return HFBackend(args.model_dir, sampling, chat_template_kwargs=args.chat_template_kwargs,
                     dtype=args.dtype, device=args.device,
                     trust_remote_code=args.trust_remote_code,
                     max_context_tokens=args.max_context_tokens, shift=shift,
                     batch_size=args.batch_size)


def main(argv=None) -> int:
    """The `evaluate` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    with exit_on_interrupt("evaluate"):  # scored items are kept: the same command resumes
        return _evaluate(args)


def _evaluate(args) -> int:
    try:
        if args.backend == "hf":
            check_hf_model_folder(args.model_dir)
        shift = shift_of(args)
        plan = EvaluationPlan(
            benchmarks=tuple(args.benchmarks), languages=tuple(args.languages), runs=args.runs,
            seed=args.seed, limit=args.limit, data_dir=args.data_dir,
            template_language=args.template_language, templates=args.templates_data,
            protocol=args.protocol)
        runner = EvaluationRunner(None, plan, args.output, settings_of(args),
                                  progress=not args.no_progress, restart=args.restart)
        runner.prepare()  # refuses another model's folder or changed benchmarks before loading
        runner.use_backend(build_backend(args, shift))
    except FileNotFoundError as e:  # a benchmark file --data-dir lacks
        return report_user_error("evaluate", InputError(str(e)), args.output)
    except Exception as e:  # noqa: BLE001 - a model folder of the wrong kind, another model's
        # answers in --output: one line; anything else raises
        return report_user_error("evaluate", e, args.output)
    try:
        result = asyncio.run(runner.run())
    except EvaluationIncomplete as e:  # no user error: the same command resumes (exit 1)
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        return report_user_error("evaluate", InputError(str(e)), args.output)
    except Exception as e:  # noqa: BLE001 - bad data (names the file and line), items too long
        return report_user_error("evaluate", e, args.output)
    with open(os.path.join(args.output, "table.md"), encoding="utf-8") as f:
        print(f.read(), end="")
    if not result["complete"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
