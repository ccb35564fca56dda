"""The experiment's tokenizer and its randomly initialised tiny Qwen3-MoE (an HF folder)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Qwen3-MoE small enough to train from scratch on two CPU cores in minutes."""
    hidden_size: int = 96
    num_layers: int = 8  # deep enough to have middle layers between the ends of a U-curve
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 24
    num_experts: int = 8
    top_k: int = 2
    moe_ffn_hidden_size: int = 96
    vocab_size: int = 512
    max_position_embeddings: int = 512


def build_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int):
    """The project's local BPE tokenizer over the experiment's texts; its four scripts need about
    a hundred distinct characters, more than the local tokenizer's default alphabet.

    Args:
        texts: The texts to learn the vocabulary from.
        out_dir: Where the tokenizer files are written.
        vocab_size: The vocabulary size.
    """
    from sara_megatron.data.local_tokenizer import build_local_tokenizer

    return build_local_tokenizer(texts, out_dir, vocab_size=vocab_size, limit_alphabet=256)


def write_random_hf_model(out_dir: Path, tokenizer_dir: Path, shape: ModelShape, seed: int) -> None:
    """Write a randomly initialised Qwen3-MoE of `shape`, saved as the hub ships models, with the
    tokenizer's files copied beside it.

    Args:
        out_dir: The HF folder to write.
        tokenizer_dir: The tokenizer folder whose files are copied into `out_dir`.
        shape: The model's shape.
        seed: The torch seed of the initialisation.
    """
    import torch
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=4 * shape.hidden_size, moe_intermediate_size=shape.moe_ffn_hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        num_experts=shape.num_experts, num_experts_per_tok=shape.top_k, rms_norm_eps=1e-6,
        rope_theta=10000.0, norm_topk_prob=True,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False,
        router_aux_loss_coef=1e-3, bos_token_id=None, eos_token_id=3, pad_token_id=0,
    )
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    model.generation_config.eos_token_id = 3
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(tokenizer_dir / name, out_dir / name)
