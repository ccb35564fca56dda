"""The demo's translator: the demo's rules behind the OpenAI wire format on 127.0.0.1.

`make demo` makes its targets by running `tools/translate_corpus.py` against this server, so the
real client, cache and checks run on every demo. The rules are those of the synthetic corpus
(`sara_megatron.data.synthetic_corpus`), whose "languages" are word lists over one syllable set:

- `hi`: each anchor word swapped for the word at the same place in the hi word list, written in
  Devanagari (one syllable, one akshara: `ka` -> `का`), so the script check sees Hindi's script;
- `sw`: the same swap with the sw word list, then the word order reversed (a final punctuation
  token, `\\boxed{}` included, stays last).

Tokens outside the anchor's word list (`?`, `\\boxed{47}`) are kept as they are. The server reads
the target from the system message's `Target language: <name> (<code>)` line and answers in the
request's shape (plain text, or a JSON object of the same keys); see `translation_wire`.

    python -m sara_megatron.construction.rule_translator --port 8000   # serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import time

from sara_megatron.chat.server import LocalChatServer
from sara_megatron.construction.translation_wire import read_request
from sara_megatron.data.synthetic_corpus import _word_list  # the corpus's own lexicons

ANCHOR = "en"
TARGETS = ("hi", "sw")
_CONSONANTS = {"k": "क", "l": "ल", "m": "म", "n": "न", "p": "प", "r": "र", "s": "स", "t": "त",
               "v": "व", "z": "ज", "b": "ब", "d": "द"}
_VOWEL_SIGNS = {"a": "ा", "i": "ि", "u": "ु", "e": "े", "o": "ो"}


def to_devanagari(word: str) -> str:
    """A word of consonant-vowel syllables (`kalo`) in Devanagari (`कालो`).

    Args:
        word: Latin consonant-vowel pairs of the synthetic corpus.

    Raises:
        ValueError: A word not made of those syllables.
    """
    if len(word) % 2 or any(word[i] not in _CONSONANTS or word[i + 1] not in _VOWEL_SIGNS
                            for i in range(0, len(word), 2)):
        raise ValueError(f"{word!r} is not made of the synthetic corpus's syllables")
    return "".join(_CONSONANTS[word[i]] + _VOWEL_SIGNS[word[i + 1]] for i in range(0, len(word), 2))


def reorder_words(text: str) -> str:
    """The word-order change: words in reverse order, a final punctuation token kept last.

    Args:
        text: Space-separated words.
    """
    words = text.split()
    if len(words) > 1 and not words[-1][0].isalnum():
        return " ".join(words[-2::-1] + [words[-1]])
    return " ".join(reversed(words))


class RuleTranslator:
    """The demo's translator: a lexicon swap of the synthetic corpus's words (hi: into
    Devanagari; sw: then the word order reversed). An instance is a `LocalChatServer` responder.
    """

    def __init__(self):
        anchor_words = _word_list(ANCHOR)
        self.lexicons = {}
        for target in TARGETS:
            words = _word_list(target)
            if target == "hi":
                words = [to_devanagari(w) for w in words]
            self.lexicons[target] = dict(zip(anchor_words, words))

    def translate(self, text: str, target: str) -> str:
        """The translation of a text.

        Args:
            text: Anchor-language words (unknown words are kept).
            target: "hi" or "sw".

        Raises:
            ValueError: Another target.
        """
        if target not in self.lexicons:
            raise ValueError(f"the rule translator knows only {', '.join(TARGETS)}, not {target!r}")
        lexicon = self.lexicons[target]
        swapped = " ".join(lexicon.get(word, word) for word in text.split())
        return reorder_words(swapped) if target == "sw" else swapped

    def __call__(self, body: dict) -> str:
        """The server's responder: one chat request in, the translation in the request's shape.

        Args:
            body: The chat request's body (`translation_wire.read_request` reads it).

        Returns:
            The translation: a JSON object of the texts by key, or the one plain text.
        """
        target, texts = read_request(body)
        if isinstance(texts, dict):
            return json.dumps({k: self.translate(v, target) for k, v in texts.items()},
                              ensure_ascii=False)
        return self.translate(texts, target)


def rule_translator_server(port: int = 0) -> LocalChatServer:
    """The server, not yet started: `with rule_translator_server() as server: server.base_url`.

    Args:
        port: 0 picks a free one.

    Returns:
        A `LocalChatServer` answering with a `RuleTranslator`.
    """
    return LocalChatServer(RuleTranslator(), port=port)


def main():
    """`python -m sara_megatron.construction.rule_translator [--port N]`: serve until Ctrl-C."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    with rule_translator_server(args.port) as server:
        print(f"rule translator on {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
