"""Per-layer routing divergence JS(anchor ‖ target) of a checkpoint, on token shards or on an
evaluation benchmark taken as a parallel set, with the alignment range it suggests.

    python tools/routing_divergence.py --shards data/shards --checkpoint runs/sara/iter_0000040 \
        --model qwen3_moe_tiny --json divergence.json --plot divergence.png
    python tools/routing_divergence.py --benchmark global_mmlu --languages hi,ne,bn,te,sw \
        --data-dir benchmarks/ --checkpoint Qwen3-30B-A3B --json qwen3_gmmlu.json \
        --plot qwen3_gmmlu.png --expert-usage usage.json --usage-plots usage/ --usage-layers 7,20,34

--checkpoint is a Megatron checkpoint (converted or trained, any layout it was saved at) or an
HF folder (exported or from the hub; read in memory through the converter's mapping). Per layer
and target language it prints the mean over parallel groups of the JS divergence between the
target's and its anchor's sequence-mean dense routing, and the entropy-normalised JS (JS over the
mean entropy of the two distributions). The suggested alignment range: the longest run of layers
whose moving average (width --range-window) of the mean divergence over languages stays
<= min + --range-alpha * (max - min) (docs/analysis.md); it is printed, saved in the JSON (which
training takes as `sara.layers: <file>`) and shaded on the plot. A benchmark item is the prompt
the model is evaluated on, in the model's chat template; groups are its item id across languages.
A ShifCon run's checkpoint or export (shifcon.json) is measured shifted per language, as it was
trained; --no-shift measures it unshifted.
Under torchrun, a rank that fails prints its traceback and exits at once.
"""

import argparse
import sys
import os

from sara_megatron.analysis import format_divergence_table, routing_analysis
from sara_megatron.analysis.alignment_range import (
    DEFAULT_ALPHA,
    DEFAULT_WINDOW,
    check_range_parameters,
    suggest_alignment_range,
)
from sara_megatron.analysis.divergence_plots import plot_u_curve
from sara_megatron.analysis.divergence_results import DivergenceResult, write_divergence
from sara_megatron.analysis.model_loading import (
    default_tokenizer_folder,
    is_hf_folder,
    load_analysis_weights,
)
from sara_megatron.distributed import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    model_process_groups,
)
from sara_megatron.launch import (
    ToolArgumentParser,
    configure_logging,
    exit_at_once_on_error,
    exit_with_parent,
    launcher_rank,
)
from sara_megatron.models.architecture import resolve_architecture
from sara_megatron.models.builder import build_model
from sara_megatron.priors import parse_layer_selection
from sara_megatron.sara.language_shift import has_shift_sidecar, read_shift_sidecar
from sara_megatron.tool_errors import UserFacingError, check_writable_output

BENCHMARKS = ("global_mmlu", "belebele", "mgsm")


def parse_args(argv=None):
    """The checked command line, every output checked writable before the compute, with
    `arch`, `layers`, `usage_layers`, `languages` (a list or None) and, for a benchmark,
    `tokenizer` resolved.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = ToolArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--shards", help="token shard folder (tools/shard_corpus.py)")
    data.add_argument("--benchmark", choices=BENCHMARKS, help="an evaluation benchmark as the "
                      "parallel set (from --data-dir, else the hub)")
    p.add_argument("--checkpoint", required=True, help="Megatron checkpoint folder or HF folder")
    p.add_argument("--model", help="preset name or HF config.json / folder (default: an HF "
                   "--checkpoint's own config)")
    p.add_argument("--layers", default="all", help="'all', '7-34' or '0,3,8-11'")
    p.add_argument("--languages", nargs="*", help="target languages, 'hi ne' or 'hi,ne' (default: "
                   "every target of the shards; required with --benchmark)")
    p.add_argument("--anchor", default="en", help="anchor language of --benchmark (default en)")
    p.add_argument("--data-dir", help="--benchmark files: DIR/<benchmark>/<lang>.jsonl in the "
                   "hub's columns")
    p.add_argument("--limit", type=int, help="--benchmark: the first N items per language")
    p.add_argument("--tokenizer", help="--benchmark: the model's tokenizer folder (default: an HF "
                   "--checkpoint, or a converted checkpoint's hf_assets/)")
    p.add_argument("--allow-download", action="store_true",
                   help="--tokenizer may be a hub id fetched over the network")
    p.add_argument("--seq-length", type=int, help="--benchmark: cut prompts at this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="write the result (layers, divergence, normalized_divergence, "
                   "suggested_range) here")
    p.add_argument("--entropy-normalized", action="store_true", help="print, plot and pick the "
                   "range from the entropy-normalised JS (both are saved in the JSON)")
    p.add_argument("--range-alpha", type=float, default=DEFAULT_ALPHA,
                   help="threshold position between the curve's min and max "
                   f"(default {DEFAULT_ALPHA})")
    p.add_argument("--range-window", type=int, default=DEFAULT_WINDOW,
                   help=f"odd moving-average width in layers; 1 = none (default {DEFAULT_WINDOW})")
    p.add_argument("--plot", help="write the U-curve with the suggested range here (PNG)")
    p.add_argument("--language-vectors",
                   help="the base model's language vectors over contiguous layers "
                        "(tools/extract_language_vectors.py, sentence_l2): also suggest "
                        "ShifCon's shift_layer / shift_back_layer from their subspace distance "
                        "(printed and saved in the JSON as shift_area; docs/analysis.md)")
    p.add_argument("--expert-usage", help="also measure each language's expert usage and write "
                   "it here (JSON)")
    p.add_argument("--usage-plots", help="folder for one expert-usage heatmap PNG per layer of "
                   "--usage-layers (needs --expert-usage)")
    p.add_argument("--usage-layers", help="layers of the heatmaps (default: every measured layer)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of --shards on first open (structure and token "
                        "ids are checked)")
    p.add_argument("--no-shift", action="store_true",
                   help="a ShifCon checkpoint or export: measure it without its per-language shift")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error the user can fix too")
    args = p.parse_args(argv)

    for name in ("batch_size", "limit", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        check_range_parameters(args.range_alpha, args.range_window)
    except ValueError as err:
        p.error(f"--range-alpha / --range-window: {err}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    if args.shards and not os.path.isdir(args.shards):
        p.error(f"--shards {args.shards}: no such directory")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such directory")
    if args.language_vectors and not os.path.isfile(args.language_vectors):
        p.error(f"--language-vectors {args.language_vectors}: no such file")
    for flag in ("json", "plot", "expert_usage"):
        path = getattr(args, flag)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{flag.replace('_', '-')} {path}: its folder does not exist")
    try:  # every output, before the compute (not after the table is printed)
        for flag in ("json", "plot", "expert_usage"):
            if getattr(args, flag):
                check_writable_output(getattr(args, flag), f"--{flag.replace('_', '-')}",
                                      is_file=True)
        if args.usage_plots:
            check_writable_output(args.usage_plots, "--usage-plots")
    except OSError as err:
        p.error(str(err.strerror or err))
    if args.usage_plots and not args.expert_usage:
        p.error("--usage-plots needs --expert-usage (the measured usage it draws)")
    args.languages = [c for part in (args.languages or []) for c in part.split(",") if c] or None
    if args.benchmark:
        if not args.languages:
            p.error("--benchmark needs --languages (the target languages)")
        from sara_megatron.evaluation.benchmarks import benchmark_file, check_benchmark_language

        for language in [args.anchor, *args.languages]:
            try:
                check_benchmark_language(args.benchmark, language)
            except ValueError as err:
                p.error(f"--anchor / --languages: {err}")
            if args.data_dir and not os.path.isfile(benchmark_file(args.data_dir, args.benchmark,
                                                                   language)):
                p.error(f"--data-dir {args.data_dir}: no {args.benchmark}/{language}.jsonl there")
        if args.tokenizer is None:
            args.tokenizer = default_tokenizer_folder(args.checkpoint)
            if args.tokenizer is None:
                p.error(f"--checkpoint {args.checkpoint} holds no tokenizer; give --tokenizer")
    if args.model is None:
        if not is_hf_folder(args.checkpoint):
            p.error("--model is needed with a Megatron --checkpoint (a preset or the HF folder "
                    "it was converted from)")
        args.model = args.checkpoint
    try:
        args.arch = resolve_architecture(args.model)
        args.layers = list(parse_layer_selection(args.layers, args.arch.num_layers))
        args.usage_layers = (list(parse_layer_selection(args.usage_layers, args.arch.num_layers))
                             if args.usage_layers else args.layers)
    except (ValueError, OSError) as err:
        p.error(f"--model / --layers / --usage-layers: {err}")
    missing = sorted(set(args.usage_layers) - set(args.layers))
    if missing:
        p.error(f"--usage-layers {missing} are not among the measured --layers")
    return args


def load_parallel_set(args):
    """The parallel set the command line names, and what it records as the result's source.

    Args:
        args: The parsed command line (--shards, or --benchmark with its options).

    Returns:
        (`TokenShards` or `BenchmarkParallelSet`, {source field: value}).
    """
    if args.shards:
        from sara_megatron.data.token_shards import TokenShards

        shards = TokenShards(args.shards, verify=not args.no_verify)
        for language in [shards.anchor_language, *(args.languages or shards.target_languages)]:
            if language in shards.languages:  # checked before the progress bar starts
                shards.check_language(language)
        return shards, {"shards": os.path.abspath(args.shards)}
    from sara_megatron.analysis.benchmark_parallel_set import BenchmarkParallelSet
    from sara_megatron.data.chat_tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, allow_download=args.allow_download)
    data = BenchmarkParallelSet(tokenizer, args.benchmark, args.anchor, args.languages,
                                args.data_dir, args.limit, args.seq_length)
    source = {"benchmark": args.benchmark, "data_dir": args.data_dir, "limit": args.limit,
              "tokenizer": args.tokenizer}
    return data, source


def main(argv=None) -> int:
    """The `routing_divergence` tool: parse `argv` and run it.

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
    with exit_at_once_on_error(rank, "routing_divergence.py", output=args.json, debug=args.debug):
        run(args, rank)
    destroy_distributed()  # only after success: its barrier needs every rank


def run(args, rank):
    """Collective: build the model, measure the routing divergence and, on rank 0, print the table
    and the suggested range and write the outputs the command line asks for.

    Args:
        args: The parsed command line.
        rank: This process's global rank.

    Raises:
        UserFacingError: --language-vectors holds vectors other than sentence_l2 ones.
    """
    from tqdm import tqdm

    initialize_distributed(ParallelConfig())
    model = build_model(args.arch)
    kind = load_analysis_weights(model, args.checkpoint)
    data, source = load_parallel_set(args)
    shift = None
    if has_shift_sidecar(args.checkpoint):
        shift = None if args.no_shift else read_shift_sidecar(args.checkpoint)
        source["shifcon_shift"] = "applied" if shift is not None else "not applied (--no-shift)"
        if rank == 0:
            print(f"{shift.describe()}, per language" if shift is not None
                  else "ShifCon checkpoint measured without its shift (--no-shift)")
    targets = args.languages
    languages = [data.anchor_language, *(targets or data.target_languages)]
    bar = tqdm(total=len(languages), desc="languages routed", disable=rank != 0)
    analysis = routing_analysis(model, data, args.layers, targets, args.batch_size,
                                top_k=args.arch.moe_router_topk if args.expert_usage else None,
                                progress=lambda language: bar.update(1),
                                process_groups=model_process_groups(), shift=shift)
    bar.close()
    if rank != 0:
        return
    curve = "normalized" if args.entropy_normalized else "js"
    result = DivergenceResult(analysis.layers, analysis.divergence, analysis.normalized,
                              analysis.anchor, {"checkpoint": os.path.abspath(args.checkpoint),
                                                "checkpoint_kind": kind, **source,
                                                "groups": analysis.groups})
    shown = result.curves(args.entropy_normalized)
    print(format_divergence_table(args.layers, {"JS / entropy" if args.entropy_normalized
                                                else "JS": shown}))
    try:
        found = suggest_alignment_range(args.layers, shown, args.range_alpha, args.range_window)
        result.suggested_range = found.to_json(curve)
        print(f"suggested alignment range: layers {found.first_layer}..{found.last_layer} "
              f"(mean {curve} curve smoothed over {found.window} layers <= {found.threshold:.4g} "
              f"= min + {found.alpha:g} x (max - min))")
    except ValueError as err:  # e.g. measured layers with gaps
        print(f"no suggested alignment range: {err}")
    if args.language_vectors:
        from sara_megatron.analysis.shift_area import shift_area_from_vectors
        from sara_megatron.sara.shifcon_vectors import load_language_vectors

        vectors = load_language_vectors(args.language_vectors)
        if vectors.normalisation != "sentence_l2":
            raise UserFacingError(f"--language-vectors {args.language_vectors} holds "
                                  f"{vectors.normalisation} vectors; the shift area needs "
                                  "sentence_l2 ones (tools/extract_language_vectors.py "
                                  "--normalisation sentence_l2, its default)")
        area = shift_area_from_vectors(vectors, args.range_alpha, args.range_window,
                                       num_layers=args.arch.num_layers)
        result.shift_area = area.to_json()
        print(f"suggested ShifCon area: shift_layer {area.shift_layer}, shift_back_layer "
              f"{area.shift_back_layer} (subspace distance of the language vectors, "
              f"{args.language_vectors})")
    if args.json:
        write_divergence(args.json, result)
    if args.plot:
        plot_u_curve(result, args.plot, normalized=args.entropy_normalized)
    if args.expert_usage:
        from sara_megatron.analysis.expert_usage import (
            from_analysis,
            plot_expert_usage,
            write_expert_usage,
        )

        usage = from_analysis(analysis)
        write_expert_usage(args.expert_usage, usage)
        if args.usage_plots:
            os.makedirs(args.usage_plots, exist_ok=True)
            for layer in args.usage_layers:
                plot_expert_usage(usage, layer,
                                  os.path.join(args.usage_plots, f"expert_usage_layer{layer}.png"))


if __name__ == "__main__":
    sys.exit(main())
