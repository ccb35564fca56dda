"""Extract anchor routing priors into a prior store (torchrun; any TP / EP / PP / DP layout).

    torchrun --nproc-per-node 8 tools/extract_priors.py --shards data/shards \
        --checkpoint ckpt/qwen3-30b-a3b --output data/priors \
        --layers 7-34 --ep 8 --micro-batch-size 2

Runs the anchor-language sequences of the token shards (tools/shard_corpus.py) through the model
before fine-tuning and stores, per sample and layer, the masked sequence mean of the dense fp32
routing softmax over all experts. Every non-padding token counts (prompt and response). A rerun
after a kill skips the samples already stored. The store records the model's fingerprint (see
sara_megatron/priors/fingerprint.py) and the anchor shards' fingerprint.
A rank that fails prints its traceback and exits at once (torchrun then stops the others); a
damaged shard or checkpoint, an unwritable --output or a full disk prints one line and exits 2.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.launch import (
    configure_logging,
    exit_at_once_on_error,
    exit_with_parent,
    launcher_rank,
)
from sara_megatron.models.architecture import PRESET_NAMES, resolve_architecture
from sara_megatron.models.builder import ModelOptions, build_model
from sara_megatron.priors import (
    PriorStoreMetadata,
    PriorStoreWriter,
    model_fingerprint,
    parse_layer_selection,
)
from sara_megatron.priors.extraction import ExtractionProgress, ExtractionSettings, extract_priors
from sara_megatron.tool_errors import check_writable_output


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", required=True, help="token shard directory (tools/shard_corpus.py)")
    p.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory (torch_dist)")
    p.add_argument("--model",
                   help=f"preset ({', '.join(PRESET_NAMES)}) or an HF config.json path; default: "
                        "the config.json the converter kept in <checkpoint>/hf_assets/")
    p.add_argument("--output", required=True, help="prior store directory")
    p.add_argument("--layers", default="all", help="'all', '7-34' (inclusive) or '0,3,8-11'")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="storage dtype of the priors (computed in fp32 either way)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per schedule call (default: PP size, to fill the pipeline)")
    p.add_argument("--flush-every", type=int, default=256,
                   help="samples per store shard and replica (what a kill can cost)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 weights and activations (router logits and softmax stay fp32); "
                        "recorded in the store: resuming it without --bf16 is refused, and "
                        "the other way round")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the token shards against their manifest on "
                        "first open (structure and token ids are checked; the corpus "
                        "fingerprint is computed from the files either way)")
    args = p.parse_args(argv)
    # Checked here, not after the model is built and loaded (and a store.json written).
    for flag in ("tp", "ep", "pp", "micro_batch_size", "num_microbatches", "flush_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such directory")
    if not os.path.isdir(args.shards):
        p.error(f"--shards {args.shards}: no such directory")
    try:
        check_writable_output(args.output, "--output")
    except OSError as err:
        p.error(str(err.strerror or err))
    return args


class ProgressPrinter:
    """Progress on stderr (rank 0), at most every `interval_s` seconds and at the end."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.last = -float("inf")

    def __call__(self, p: ExtractionProgress) -> None:
        finished = p.samples_done >= p.samples_total
        if p.elapsed_s - self.last < self.interval_s and not finished:
            return
        self.last = p.elapsed_s
        rate = p.samples_done / max(p.elapsed_s, 1e-9)
        eta = (p.samples_total - p.samples_done) / max(rate, 1e-9)
        print(f"extract_priors: {p.samples_done}/{p.samples_total} samples "
              f"({p.already_done} from an earlier run), {p.tokens_done} tokens, "
              f"{rate:.2f} samples/s, anchor NLL {p.mean_nll:.3f}, eta {eta:.0f}s",
              file=sys.stderr, flush=True)


def shared_model_fingerprint(checkpoint: str) -> str:
    """Computed once on rank 0 (hashing a large checkpoint is slow) and broadcast."""
    box = [model_fingerprint(checkpoint) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def model_architecture(args):
    if args.model:
        return resolve_architecture(args.model)
    config = os.path.join(args.checkpoint, "hf_assets", "config.json")
    if not os.path.exists(config):
        raise SystemExit(f"{args.checkpoint} was not made by tools/convert_hf.py (no {config}): "
                         "name the model with --model")
    return resolve_architecture(config)


def run(args) -> dict:
    """Collective: (re)initialise Megatron at the requested layout and extract the store."""
    arch = model_architecture(args)
    arch.validate_parallel(tp=args.tp, ep=args.ep, pp=args.pp)
    layers = parse_layer_selection(args.layers, arch.num_layers)
    shards = TokenShards(args.shards, verify=not args.no_verify)
    vocab = shards.vocab_size
    if vocab > arch.vocab_size:
        raise SystemExit(f"the shards' tokenizer has {vocab} ids, the model embeds "
                         f"{arch.vocab_size}: sharded with another model's tokenizer?")

    initialize_distributed(ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_model(arch, ModelOptions(params_dtype=dtype, bf16=args.bf16))
    load_model_weights(model, args.checkpoint)
    metadata = PriorStoreMetadata(
        layers=layers,
        num_experts=arch.num_experts,
        dtype=args.dtype,
        anchor_language=shards.anchor_language,
        model_fingerprint=shared_model_fingerprint(args.checkpoint),
        # From the anchor shards' files as they are (verified), not copied from the manifest.
        corpus_fingerprint=shards.language_fingerprint(shards.anchor_language),
        compute_dtype="bf16" if args.bf16 else "fp32",  # a rerun with the other is refused
    )
    settings = ExtractionSettings(
        layers=layers,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.pp if args.num_microbatches is None else args.num_microbatches,
        flush_every=args.flush_every,
    )
    result = extract_priors(model, shards, PriorStoreWriter(args.output, metadata), settings,
                            progress=ProgressPrinter())
    if dist.get_rank() == 0:
        print(f"extract_priors: {result['store']['num_samples']} samples in {args.output} "
              f"({result['samples_extracted']} extracted now, {result['samples_resumed']} "
              f"resumed; layers {layers[0]}..{layers[-1]} ({len(layers)}), "
              f"{arch.num_experts} experts, {args.dtype}, computed in {metadata.compute_dtype}) "
              f"in {result['elapsed_s']:.1f}s")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_with_parent()
    rank = launcher_rank()
    configure_logging(rank)
    with exit_at_once_on_error(rank, "extract_priors.py", output=args.output):
        run(args)
    destroy_distributed()  # only after success: its barrier needs every rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
