"""Extract ShifCon's language vectors: the mean hidden state entering chosen layers, per language
(torchrun; any TP / EP / PP / DP layout).

    torchrun --nproc-per-node 8 tools/extract_language_vectors.py --shards data/shards \
        --checkpoint ckpt/qwen3-30b-a3b --output data/language_vectors.safetensors \
        --layers 7,34 --ep 8

Runs every sample of every language of the token shards (prompt and response; padding left out)
through the model before fine-tuning and averages, per language, the hidden state entering each
chosen layer (HF's 0-based `model.layers.i`): by default each sample's mean L2-normalised, then
averaged over the language's samples, as ShifCon's authors do (`--normalisation token_mean`: the
mean over every token). The output is one safetensors file: a [layers, H] fp32 tensor per
language, with the layers, the anchor language, the normalisation and the model's fingerprint in
its metadata. Training with sara.objective shifcon reads it (docs/objectives.md).
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.data.token_shards import TokenShards
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
from sara_megatron.models.builder import ModelOptions, build_model
from sara_megatron.priors import parse_layer_selection
from sara_megatron.sara.shifcon_extraction import NORMALISATIONS, extract_language_vectors
from sara_megatron.sara.shifcon_vectors import LanguageVectors, save_language_vectors
from sara_megatron.tool_errors import check_writable_output
from sara_megatron.training.config import ConfigError


def parse_args(argv=None):
    """The checked command line (parallel sizes, folders and the .safetensors output).

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = ToolArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", required=True, help="token shard directory (tools/shard_corpus.py)")
    p.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory (torch_dist)")
    p.add_argument("--model", help="preset name or HF config.json (default: the checkpoint's)")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--layers", required=True,
                   help="the shift and shift-back layers, e.g. '7,34' (any selection: '0,3,8-11')")
    p.add_argument("--languages", default="all", help="'all' (default) or comma-separated codes")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--normalisation", choices=NORMALISATIONS, default="sentence_l2",
                   help="sentence_l2 (default, as ShifCon's authors compute them): each sample's "
                        "mean hidden state L2-normalised, then averaged per language; "
                        "token_mean: the mean over every token of the language")
    p.add_argument("--bf16", action="store_true", help="run the model in bf16 (sums stay fp64)")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error the user can fix too")
    args = p.parse_args(argv)
    for flag in ("tp", "ep", "pp", "micro_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    if not os.path.isdir(args.shards):
        p.error(f"--shards {args.shards}: no such directory")
    if not args.output.endswith(".safetensors"):
        p.error(f"--output {args.output}: name a .safetensors file")
    try:
        check_writable_output(args.output, "--output", is_file=True)
    except OSError as err:
        p.error(str(err.strerror or err))
    return args


def main(argv=None) -> int:
    """The `extract_language_vectors` tool: parse `argv` and run it.

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
    with exit_at_once_on_error(rank, "extract_language_vectors.py", output=args.output,
                               debug=args.debug):
        arch = _architecture(args)
        arch.validate_parallel(tp=args.tp, ep=args.ep, pp=args.pp)
        layers = parse_layer_selection(args.layers, arch.num_layers)
        shards = TokenShards(args.shards)
        languages = (shards.languages if args.languages == "all"
                     else [c.strip() for c in args.languages.split(",") if c.strip()])
        unknown = [lang for lang in languages if lang not in shards.languages]
        if unknown:
            raise ConfigError(f"--languages {unknown} are not "
                             f"in {args.shards} (it has {shards.languages})")
        initialize_distributed(ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp))
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = build_model(arch, ModelOptions(params_dtype=dtype, bf16=args.bf16))
        load_model_weights(model, args.checkpoint)
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        progress = None
        if dist.get_rank() == 0:
            from tqdm import tqdm

            bars = {}

            def progress(language, step, steps):
                bar = bars.setdefault(language, tqdm(total=steps, desc=language, file=sys.stderr))
                bar.update(step - bar.n)
        results = extract_language_vectors([model], shards, layers, languages,
                                           args.micro_batch_size, device, progress,
                                           process_groups=model_process_groups(),
                                           normalisation=args.normalisation)
        fingerprint = [_fingerprint(args.checkpoint) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(fingerprint, src=0)
        if dist.get_rank() == 0:
            save_language_vectors(args.output, LanguageVectors(
                tuple(layers), {lang: v for lang, (v, _) in results.items()},
                shards.anchor_language, fingerprint[0],
                {lang: n for lang, (_, n) in results.items()}, args.normalisation))
            print(f"extract_language_vectors: {len(results)} languages x {len(layers)} layers, "
                  f"{args.normalisation} "
                  f"({', '.join(f'{k}: {n} tokens' for k, (_, n) in results.items())}) -> "
                  f"{args.output}")
    destroy_distributed()
    return 0


def _architecture(args):
    from sara_megatron.checkpointing.record import kept_hf_config
    from sara_megatron.models.architecture import resolve_architecture

    if args.model:
        return resolve_architecture(args.model)
    config = kept_hf_config(args.checkpoint)
    if config is None:
        raise ConfigError(f"{args.checkpoint} was not made by "
                         "tools/convert_hf.py (no hf_assets/config.json): name the model with --model")
    return resolve_architecture(config)


def _fingerprint(checkpoint: str) -> str:
    from sara_megatron.priors import model_fingerprint

    return model_fingerprint(checkpoint)


if __name__ == "__main__":
    sys.exit(main())
