"""Drop anchor samples whose question overlaps an evaluation question (13-gram overlap).

The evaluation sets overlap the training sources: Global-MMLU is translated MMLU, and MMLU-Pro
(so MMLU-ProX) is partly built from MMLU; GSM8K-style problems resemble MGSM's. An anchor sample is
contaminated when its question shares a 13-gram of normalised word tokens with any question of
Global-MMLU, BELEBELE or MGSM in the anchor's own language (a translation shares no n-grams, so
only the same language is compared).

Normalisation (`normalized_words`): NFKC, case folding, every Unicode decimal digit as 0-9, then
tokens are maximal runs of letters, combining marks and digits (punctuation, symbols and spaces
separate them); each Han or kana character is a token of its own, since Chinese and Japanese do
not separate words by spaces. A benchmark question shorter than 13 tokens is matched whole: an
anchor question with exactly the same tokens is contaminated (shorter n-grams would flag too much).
"""

from __future__ import annotations

import collections
import dataclasses
import unicodedata
from typing import Iterable, Optional, Sequence

NGRAM_SIZE = 13
DECONTAMINATION_BENCHMARKS = ("global_mmlu", "belebele", "mgsm")


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2EBEF
            or 0xF900 <= code <= 0xFAFF or 0x3040 <= code <= 0x30FF)


def normalized_words(text: str) -> list[str]:
    """The word tokens of a text for overlap checks (see the module docstring for the rules).

    Args:
        text: A question.

    Returns:
        NFKC, case-folded tokens: runs of letters and digits (native digits as ASCII), each
        CJK character its own token.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    tokens: list[str] = []
    word: list[str] = []
    for ch in text:
        if ch.isdigit() and not "0" <= ch <= "9":
            d = unicodedata.decimal(ch, None)
            ch = str(d) if d is not None else ch
        if _is_cjk(ch):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(ch)
        elif unicodedata.category(ch)[0] in "LMN":
            word.append(ch)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


def word_ngrams(tokens: Sequence[str], n: int = NGRAM_SIZE) -> Iterable[str]:
    """The n-grams of a token list.

    Args:
        tokens: From `normalized_words`.
        n: Tokens an n-gram.

    Yields:
        Each n-gram, its tokens joined by one space (none when there are fewer than n tokens).
    """
    for i in range(len(tokens) - n + 1):
        yield " ".join(tokens[i:i + n])


@dataclasses.dataclass(frozen=True)
class BenchmarkQuestion:
    """Which benchmark item an indexed n-gram comes from."""

    benchmark: str
    language: str
    item_id: str


@dataclasses.dataclass(frozen=True)
class Contamination:
    """Why a sample was dropped: the benchmark item it overlaps and the shared text."""

    benchmark: str
    item_id: str
    shared: str  # the shared n-gram (normalised tokens), or the whole short question


class ContaminationIndex:
    """The n-grams of benchmark questions, per language, each pointing at one benchmark item.

    Args:
        n: Tokens an n-gram (>= 1); a question shorter than that is matched whole.

    Raises:
        ValueError: n < 1.
    """

    def __init__(self, n: int = NGRAM_SIZE):
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self._items: list[BenchmarkQuestion] = []
        # language -> n-gram text -> index into _items (the first item that has it)
        self._ngrams: dict[str, dict[str, int]] = collections.defaultdict(dict)
        self._short: dict[str, dict[str, int]] = collections.defaultdict(dict)
        self.questions: collections.Counter = collections.Counter()  # (benchmark, language) -> count

    def add(self, benchmark: str, language: str, item_id: str, question: str) -> None:
        """Index one benchmark question (one without any word is skipped).

        Args:
            benchmark: The benchmark's name.
            language: The question's language.
            item_id: The item's id in the benchmark.
            question: Its text.
        """
        tokens = normalized_words(question)
        if not tokens:
            return
        self._items.append(BenchmarkQuestion(benchmark, language, item_id))
        index = len(self._items) - 1
        self.questions[(benchmark, language)] += 1
        if len(tokens) < self.n:
            self._short[language].setdefault(" ".join(tokens), index)
            return
        grams = self._ngrams[language]
        for gram in word_ngrams(tokens, self.n):
            grams.setdefault(gram, index)

    @property
    def languages(self) -> set[str]:
        """The languages with an indexed question."""
        return {language for _, language in self.questions}

    def match(self, language: str, question: str) -> Optional[Contamination]:
        """The first benchmark question a question overlaps.

        Args:
            language: The question's language (only that language's benchmarks are compared).
            question: The question's text.

        Returns:
            The `Contamination`, or None.
        """
        tokens = normalized_words(question)
        whole = self._short.get(language, {}).get(" ".join(tokens))
        if whole is not None:
            item = self._items[whole]
            return Contamination(item.benchmark, item.item_id, " ".join(tokens))
        grams = self._ngrams.get(language)
        if not grams:
            return None
        for gram in word_ngrams(tokens, self.n):
            hit = grams.get(gram)
            if hit is not None:
                item = self._items[hit]
                return Contamination(item.benchmark, item.item_id, gram)
        return None


def parse_benchmarks(text: str) -> tuple[str, ...]:
    """Read a `--benchmarks` value.

    Args:
        text: Comma-separated names, e.g. `global_mmlu,belebele,mgsm`.

    Returns:
        The names, first occurrence order, duplicates dropped.

    Raises:
        ValueError: None given, or an unknown name (named).
    """
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in DECONTAMINATION_BENCHMARKS]
    if not names or unknown:
        raise ValueError(f"unknown benchmark(s) {unknown or text!r} "
                         f"(known: {', '.join(DECONTAMINATION_BENCHMARKS)})")
    return names


def build_index(benchmarks: Sequence[str], languages: Iterable[str],
                data_dir: Optional[str] = None, limit: Optional[int] = None,
                n: int = NGRAM_SIZE) -> tuple[ContaminationIndex, list[str]]:
    """Index the questions of benchmarks through `evaluation.benchmarks.load_benchmark`.

    Args:
        benchmarks: Benchmark names (`parse_benchmarks`).
        languages: The languages to index.
        data_dir: Local benchmark files (None: the hub).
        limit: The first `limit` items of each benchmark and language.
        n: Tokens an n-gram.

    Returns:
        The index, and notes on (benchmark, language) pairs that do not exist.
    """
    from sara_megatron.evaluation.benchmarks import BENCHMARK_LANGUAGES, load_benchmark

    index = ContaminationIndex(n)
    notes = []
    for benchmark in benchmarks:
        for language in sorted(set(languages)):
            if language not in BENCHMARK_LANGUAGES[benchmark]:
                notes.append(f"{benchmark} has no {language}: not checked against it")
                continue
            for item in load_benchmark(benchmark, language, data_dir=data_dir, limit=limit):
                index.add(benchmark, language, item.item_id, item.question)
    return index, notes
