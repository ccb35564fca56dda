"""A synthetic parallel corpus in the corpus format, for tests, benchmarks and the CPU demo.

Each "language" is a deterministic word substitution over one shared pseudo-vocabulary, so the
copies of a sample are parallel (same structure, different surface) and ASCII-only (a local BPE
tokenizer covers them with a small vocabulary). Lengths vary from sample to sample.
"""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

_SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zu", "ba", "di")


def _word_list(language: str, size: int = 60) -> list[str]:
    rng = random.Random(f"words-{language}")
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def synthetic_record(sample_id: str, language: str, index: int, max_words: int = 40) -> dict:
    """One synthetic corpus record.

    Args:
        sample_id: Its id.
        language: Its language (the word list's).
        index: The same index gives parallel content in every language.
        max_words: The longest response, in words.

    Returns:
        A corpus record: a question, and a response ending in `\\boxed{answer}`.
    """
    rng = random.Random(f"sample-{index}")  # content depends on the sample, not the language
    words = _word_list(language)
    q = [words[rng.randrange(len(words))] for _ in range(rng.randint(3, max_words // 2))]
    a = [words[rng.randrange(len(words))] for _ in range(rng.randint(2, max_words))]
    answer = rng.randint(0, 99)
    return {
        "id": sample_id,
        "lang": language,
        "source": "synthetic",
        "answer": str(answer),
        "messages": [
            {"role": "user", "content": " ".join(q) + " ?"},
            {"role": "assistant", "content": " ".join(a) + f" \\boxed{{{answer}}}"},
        ],
    }


def write_synthetic_corpus(
    out_dir: str | os.PathLike,
    num_samples: int,
    languages: Sequence[str] = ("en", "hi", "sw"),
    max_words: int = 40,
) -> list[str]:
    """Write a parallel synthetic corpus.

    Args:
        out_dir: The folder (created).
        num_samples: Records per language.
        languages: One `{lang}.jsonl` each.
        max_words: The longest response, in words.

    Returns:
        The paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for lang in languages:
        path = os.path.join(os.fspath(out_dir), f"{lang}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(num_samples):
                rec = synthetic_record(f"syn-{i:06d}", lang, i, max_words)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def corpus_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The message texts of JSONL corpus files (to train a local tokenizer on).

    Args:
        paths: Corpus files.

    Returns:
        Every message's content, in file order.
    """
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts
