"""Hugging Face ⇄ Megatron-Core checkpoint conversion for the supported MoE families.

`tools/convert_hf.py` is the command line; the pieces:

- `mapping`: hub tensors ⇄ Megatron checkpoint tensors (QKV per query group, fc1 = [gate; up],
  padded vocabulary), the one place that correspondence lives;
- `safetensors_io`: lazy by-slice reading of (sharded) safetensors, streaming writing;
- `hf_import`: HF → torch_dist at any TP/EP/PP, each rank reading only what it owns;
- `hf_export`: torch_dist → HF, tensor by tensor;
- `verify`: logits of transformers' model and ours on the same tokens;
- `metadata`: the record and assets beside a converted checkpoint, atomic output folders.
"""

import sys


def progress(stage: str, message: str) -> None:
    """One progress line on stderr (callers print on one rank only).

    Args:
        stage: The conversion stage shown in the prefix ("import", "export", "verify", ...).
        message: The text of the line.
    """
    print(f"[convert_hf {stage}] {message}", file=sys.stderr, flush=True)
