"""Turn a parallel record into token ids with the model's own tokenizer and chat template.

The prompt messages are rendered as the conversation so far with the generation prompt (the
assistant header), the full conversation with the response as the assistant turn. The prompt
length — where the loss mask starts — is the number of leading tokens both renderings share:
normally the whole rendered prompt; when a tokenizer merges tokens across the boundary, the merged
token counts as response, so no response text is ever masked out of the loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
from typing import Optional

import numpy as np

from sara_megatron.data.corpus_format import ParallelRecord


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                   chat_template: Optional[str] = None, allow_download: bool = False):
    """The model's HF tokenizer (`AutoTokenizer`); `chat_template` (Jinja text) replaces its
    own. A folder is read as it is; any other name is a hub id, read from the local HF cache
    unless `allow_download` — a mistyped path must not turn into a network fetch (which stalls,
    then blames the connection, on an offline cluster).

    Args:
        name_or_path: A tokenizer folder or a hub id.
        trust_remote_code: Run the model's own tokenizer code.
        chat_template: Jinja text replacing the tokenizer's chat template.
        allow_download: Let a hub id be fetched.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: A path that is no folder, or a hub id not in the cache.
        ValueError: A tokenizer without a chat template (and none given).
    """
    from transformers import AutoTokenizer

    source = os.fspath(name_or_path)
    local = os.path.isdir(source)
    if not local and (os.path.exists(source) or os.path.isabs(source)
                      or source.startswith(("./", "../", "~"))):
        raise FileNotFoundError(f"tokenizer {source}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code,
            local_files_only=local or not allow_download,
        )
    except OSError as err:
        if local or allow_download:
            raise
        raise FileNotFoundError(
            f"tokenizer {source}: no such folder, and no hub copy of that name in the local HF "
            "cache; give the model's folder, or allow the download (--allow-download)"
        ) from err
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {name_or_path} has no chat template; pass one with --chat-template FILE"
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """The fingerprint of what decides the token ids: vocabulary/merges (or the whole
    fast-tokenizer JSON), added tokens and the chat template.

    Args:
        tokenizer: An HF tokenizer.

    Returns:
        `sha256:` + the hex digest.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode("utf-8"))
    h.update((tokenizer.chat_template or "").encode("utf-8"))
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """One record's token ids and where its response starts (see the field comments)."""

    token_ids: np.ndarray  # int64 [n], n <= seq_length
    prompt_length: int  # tokens before the response (loss mask starts here), <= n
    untruncated_length: int

    @property
    def truncated(self) -> bool:
        """Whether tokens were cut at the sequence length."""
        return self.untruncated_length > len(self.token_ids)

    @property
    def response_length(self) -> int:
        """The tokens kept after the prompt (the loss is on them)."""
        return len(self.token_ids) - self.prompt_length


def _encode(tokenizer, text: str) -> list[int]:
    # The chat template already wrote any BOS / special tokens into the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_conversation(tokenizer, record: ParallelRecord) -> tuple[str, str]:
    """A record through the tokenizer's chat template.

    Args:
        tokenizer: An HF tokenizer with a chat template.
        record: The record.

    Returns:
        (prompt text ending in the assistant header, full conversation text).
    """
    prompt = tokenizer.apply_chat_template(
        record.chat(record.prompt_messages), tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(record.chat(), tokenize=False, add_generation_prompt=False)
    return prompt, full


def check_seq_length(seq_length: int) -> None:
    """A sample keeps at most `seq_length` tokens: below 1 nothing would be left to train on (and
    a negative one would silently cut tokens from the end instead).

    Args:
        seq_length: The value to check.

    Raises:
        ValueError: Not a positive integer.
    """
    is_count = isinstance(seq_length, numbers.Integral) and not isinstance(seq_length, bool)
    if not is_count or seq_length < 1:
        raise ValueError(f"seq_length must be a positive number of tokens, got {seq_length!r}")


def tokenize_record(tokenizer, record: ParallelRecord, seq_length: int) -> TokenizedSample:
    """A record's token ids, cut at `seq_length`, and its prompt length (the tokens the prompt
    and the full conversation share).

    Args:
        tokenizer: An HF tokenizer with a chat template.
        record: The record.
        seq_length: Tokens kept at most (>= 1).

    Returns:
        The `TokenizedSample`.

    Raises:
        ValueError: A bad seq_length.
    """
    check_seq_length(seq_length)
    prompt_text, full_text = render_conversation(tokenizer, record)
    prompt_ids = _encode(tokenizer, prompt_text)
    full_ids = _encode(tokenizer, full_text)
    shared = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        shared += 1
    ids = np.asarray(full_ids[:seq_length], dtype=np.int64)
    return TokenizedSample(ids, min(shared, len(ids)), len(full_ids))
