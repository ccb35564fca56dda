"""torchrun worker (2 ranks): `convert_hf` import at TP=2, EP=2 and PP=2 for each given HF model,
then each imported checkpoint loaded at another layout gives the logits of the TP=EP=PP=1 import.

Arguments: --model NAME=HF_DIR=REF_MCORE (repeatable; REF_MCORE is an import at (1,1,1) made by the
test), --out-root where `<NAME>_<layout>` checkpoints go, --result JSON written by rank 0:
{NAME: {"<src>-><dst>": max |logits - reference logits|}}.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.conversion.hf_import import import_hf_checkpoint
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.models.architecture import from_hf_config
from sara_megatron.models.builder import build_model, causal_attention_mask

LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}
# Each import loaded at a different layout than it was written at.
CROSS = [("tp2", "ep2"), ("ep2", "pp2"), ("pp2", "tp2"), ("tp2", "base")]
BATCH, SEQ = 2, 12


@torch.no_grad()
def logits_at(arch, ckpt: str, layout: dict) -> torch.Tensor:
    """Logits over the HF vocabulary for a fixed batch, at `layout`, on every rank (taken on the
    last pipeline stage, gathered over TP, shared with all ranks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    initialize_distributed(ParallelConfig(**layout))
    model = build_model(arch).eval()
    load_model_weights(model, ckpt)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=generator)
    captured = []

    def forward_step(data_iterator, chunk):
        tok = next(data_iterator)
        out = chunk(tok, torch.arange(SEQ).expand(BATCH, SEQ), causal_attention_mask(SEQ))
        def keep(output):
            captured.append(gather_from_tensor_model_parallel_region(output))
            return output.sum() * 0, {}
        return out, keep

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
    )
    mine = captured[0] if captured and ps.get_tensor_model_parallel_rank() == 0 else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    found = [g for g in gathered if g is not None]
    return found[0][..., : arch.vocab_size].float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--out-root", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args()

    result = {}
    for spec in args.model:
        name, hf_dir, base = spec.split("=")
        arch = from_hf_config(hf_dir)
        ckpts = {"base": base}
        for layout, sizes in LAYOUTS.items():
            ckpts[layout] = os.path.join(args.out_root, f"{name}_{layout}")
            import_hf_checkpoint(hf_dir, ckpts[layout], **sizes)
        reference = logits_at(arch, base, {})
        result[name] = {}
        for src, dst in CROSS:
            got = logits_at(arch, ckpts[src], LAYOUTS.get(dst, {}))
            result[name][f"{src}->{dst}"] = (got - reference).abs().max().item()
        result[name]["reference_max_abs"] = reference.abs().max().item()
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
