"""Logits parity: transformers' model on the HF folder vs our Megatron model on the converted
checkpoint, for the same random token batch (fp32, eval mode, one process; GPU when there).

Reported over the first `vocab_size` logits (the padded rows are ours alone):
`max_abs_diff`, `mean_abs_diff`, `cosine` (the smallest per-position cosine similarity) and
`argmax_agreement` (fraction of positions whose top token agrees).

Both models are whole in this one process (transformers' in fp32, then ours in fp32): a check for
models that fit, not a streaming tool.

Longrope: transformers 5.23's `PhimoeRotaryEmbedding` never applies `long_factor` (it recomputes
the frequencies without the sequence length), so for a PhiMoE model past
`original_max_position_embeddings` (4096 for Phi-3.5-MoE) it no longer computes the reference
longrope. The default sequence length stays far below that switch; a longer one is warned about.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.checkpointing.record import METADATA_FILE
from sara_megatron.conversion import progress
from sara_megatron.conversion.errors import ConversionError
from sara_megatron.conversion.hf_export import checkpoint_source


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The limits a converted checkpoint's logits must meet (the verify command's flags).

    Args:
        max_abs_diff: The largest allowed |logits difference| (--max-abs-diff).
        min_argmax_agreement: The smallest allowed fraction of positions whose top token agrees
            (--min-argmax-agreement).
        min_cosine: The smallest allowed per-position cosine similarity (--min-cosine); None
            leaves it unchecked.
    """
    max_abs_diff: float = 1e-4
    min_argmax_agreement: float = 1.0
    min_cosine: float | None = None


def logits_comparison(expected: torch.Tensor, got: torch.Tensor) -> dict:
    """Metrics of `got` against `expected`, both [B, S, V] over the same vocabulary.

    Args:
        expected: The reference logits (transformers'), [batch, seq, vocab].
        got: Our model's logits, [batch, seq, vocab].

    Returns:
        A dict of floats: `max_abs_diff`, `mean_abs_diff`, `cosine` (the smallest per-position
        cosine similarity) and `argmax_agreement` (the fraction of positions whose top token
        agrees).
    """
    expected, got = expected.double(), got.double()
    diff = (got - expected).abs()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    agree = (got.argmax(-1) == expected.argmax(-1)).double().mean()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "cosine": cosine.min().item(),
        "argmax_agreement": agree.item(),
    }


def failed_checks(result: dict, thresholds: Thresholds) -> list[str]:
    """One phrase per check `result` fails, naming the measure, its value, the threshold and
    the flag that sets it.

    Args:
        result: The metrics of `logits_comparison`.
        thresholds: The limits to check against.

    Returns:
        The phrases; empty when the pair passes.
    """
    failed = []
    if not result["max_abs_diff"] <= thresholds.max_abs_diff:
        failed.append(f"max |logits difference| {result['max_abs_diff']:.3g} > --max-abs-diff "
                      f"{thresholds.max_abs_diff:g}")
    if not result["argmax_agreement"] >= thresholds.min_argmax_agreement:
        failed.append(f"argmax agreement {result['argmax_agreement']:.4g} < "
                      f"--min-argmax-agreement {thresholds.min_argmax_agreement:g}")
    if thresholds.min_cosine is not None and not result["cosine"] >= thresholds.min_cosine:
        failed.append(f"smallest per-position cosine {result['cosine']:.6g} < --min-cosine "
                      f"{thresholds.min_cosine:g}")
    return failed


def passes(result: dict, thresholds: Thresholds) -> bool:
    """Whether `result` meets every limit of `thresholds`.

    Args:
        result: The metrics of `logits_comparison`.
        thresholds: The limits to check against.
    """
    return not failed_checks(result, thresholds)


@torch.no_grad()
def verify_conversion(
    hf_dir: str | os.PathLike,
    megatron_dir: str | os.PathLike,
    *,
    seq_len: int = 64,
    batch: int = 2,
    seed: int = 0,
) -> dict:
    """Run both models on one random batch and compare their logits.

    Args:
        hf_dir: The HF model folder (transformers' reference).
        megatron_dir: The converted Megatron checkpoint; our model is built from the config
            recorded at import (the HF folder's when it has none).
        seq_len: Tokens per sequence.
        batch: Sequences in the batch.
        seed: Seed of the random token batch.

    Returns:
        The metrics dict of `logits_comparison` over the first `vocab_size` logits.

    Raises:
        ConversionError: `seq_len` or `batch` is not positive, no config source, or the logits'
            shapes differ.
    """
    from transformers import AutoModelForCausalLM

    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.models.architecture import from_hf_config
    from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask

    hf_dir = os.path.abspath(os.fspath(hf_dir))
    megatron_dir = os.path.abspath(os.fspath(megatron_dir))
    # Our model is built from the config recorded at import (the HF folder's when there is none).
    config_from = None if _has_metadata(megatron_dir) else hf_dir
    hf_config, _, _ = checkpoint_source(megatron_dir, config_from)
    arch = from_hf_config(hf_config)
    if seq_len < 1 or batch < 1:
        raise ConversionError("--seq-len and --batch must be positive")
    if arch.longrope is not None and seq_len > arch.longrope.original_max_position_embeddings:
        progress("verify", (
            f"warning: seq-len {seq_len} is past the longrope switch at "
            f"{arch.longrope.original_max_position_embeddings}; transformers 5.23's PhiMoE rotary "
            "embedding ignores long_factor there, so a difference is expected"
        ))

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokens = torch.randint(
        0, arch.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed)
    )

    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).to(device).eval()
    expected = hf(input_ids=tokens.to(device)).logits.float().cpu()
    del hf

    initialize_distributed(ParallelConfig())
    model = build_model(
        arch, ModelOptions(params_dtype=torch.float32, perform_initialization=False)
    ).eval()
    load_model_weights(model, megatron_dir)
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    got = model(tokens.to(device), positions, causal_attention_mask(seq_len, device=device))
    got = got[..., : arch.vocab_size].float().cpu()
    if got.shape != expected.shape:
        raise ConversionError(f"logits shapes differ: ours {tuple(got.shape)}, "
                              f"transformers {tuple(expected.shape)}")
    return logits_comparison(expected, got)


def _has_metadata(megatron_dir: str) -> bool:
    return os.path.exists(os.path.join(megatron_dir, METADATA_FILE))
