"""A small BPE tokenizer with a chat template, trained on local texts — no network.

For the CPU tests, benchmarks and the tiny demo, whose models have a vocabulary of a few hundred
ids. Real runs use the model's own tokenizer (`chat_tokenization.load_tokenizer`).
"""

from __future__ import annotations

import os
from typing import Iterable

# ChatML, as Qwen uses it: the assistant header is the generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")


def build_local_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 200,
                          limit_alphabet: int = 64):
    """Train a BPE tokenizer on `texts`, save it (save_pretrained) to `out_dir` and return it.

    Ids stay below `vocab_size`, so a model with that vocabulary can embed every token. At most
    `limit_alphabet` distinct characters are kept; rarer ones become `<unk>` (texts in several
    scripts need more than the default).

    Args:
        texts: The training texts.
        out_dir: Where the tokenizer is saved.
        vocab_size: Ids stay below it.
        limit_alphabet: Distinct characters kept.

    Returns:
        The transformers tokenizer (`PreTrainedTokenizerFast`).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    if len(fast) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} ids, more than vocab_size={vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(os.fspath(out_dir))
    return fast
