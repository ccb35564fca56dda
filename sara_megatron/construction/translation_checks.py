"""The checks every translation must pass before it enters the corpus.

A reply is rejected, with one of these reasons, when it

- `empty`: has no text;
- `truncated`: stopped at the length limit (finish reason `length`), or `content_filter`;
- `lost_boxed` / `wrong_boxed`: the source's last `\\boxed{…}` answer is missing, or differs.
  Equal means the same text (spaces aside), or the same number (native digits allowed, e.g.
  `\\boxed{७२}` for `\\boxed{72}`), or, for an option letter, the same letter;
- `wrong_script`: for hi/ne (Devanagari), bn (Bengali), te (Telugu), zh (Han), fewer than
  `MIN_SCRIPT_SHARE` of its letters are in that script. Math, code, `\\boxed{}` and LaTeX
  commands are left out of the count: they stay in Latin letters in any language;
- `wrong_language`: for en and sw, where the script says nothing, the language identifier
  (lingua, restricted to the languages of the run) names *another* language with confidence
  of at least `MIN_OTHER_CONFIDENCE`. The check rejects a confident identification as another
  language; it does not demand a confident identification as the target, which short or
  formula-heavy texts (and the demo's pseudo-words) cannot give;
- `copy`: is the source again (case and spacing aside) although the source has words to
  translate.

Languages with neither a script rule nor lingua support (codes added with --extra-languages,
and ne/te for the identifier) get the other checks only.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from sara_megatron.answers import is_choice_gold, last_boxed, normalize_choice, normalize_number, numbers_equal

MIN_SCRIPT_SHARE = 0.6
MIN_OTHER_CONFIDENCE = 0.9
MIN_WORDS_FOR_IDENTIFICATION = 3

# Unicode blocks of the scripts that identify a language.
SCRIPT_RANGES = {
    "Devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "Bengali": ((0x0980, 0x09FF),),
    "Telugu": ((0x0C00, 0x0C7F),),
    "Han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F)),
}
LANGUAGE_SCRIPTS = {"hi": "Devanagari", "ne": "Devanagari", "bn": "Bengali", "te": "Telugu",
                    "zh": "Han"}
# Languages told apart by the identifier, not the script.
IDENTIFIED_LANGUAGES = ("en", "sw")
REJECTION_REASONS = ("empty", "truncated", "content_filter", "lost_boxed", "wrong_boxed",
                     "wrong_script", "wrong_language", "copy", "unparsable_reply")

_CODE_BLOCK = re.compile(r"```.*?```|`[^`\n]*`", re.S)
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.S)
_URL = re.compile(r"https?://\S+")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _without_boxes(text: str) -> str:
    """`text` with every `\\boxed{…}` / `\\fbox{…}` removed (balanced braces)."""
    out, pos = [], 0
    while (m := _BOX_START.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        depth, i = 0, m.end() - 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        pos = i + 1
    out.append(text[pos:])
    return "".join(out)


def prose(text: str) -> str:
    """The natural-language part of `text`: without code, math, boxes, URLs and LaTeX commands
    (their brace arguments, e.g. the words of `\\text{…}`, stay).

    Args:
        text: A source or translated text.
    """
    text = _CODE_BLOCK.sub(" ", text)
    text = _without_boxes(text)
    text = _MATH.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _COMMAND.sub(" ", text)
    return text


def _in_script(ch: str, script: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in SCRIPT_RANGES[script])


def script_share(text: str, script: str) -> float | None:
    """The share of a text's letters written in a script.

    Args:
        text: A translated text (its `prose` is counted).
        script: A key of `SCRIPT_RANGES` ("Devanagari", "Han", ...).

    Returns:
        The share in [0, 1], or None when the prose has no letters.
    """
    letters = [ch for ch in prose(text) if unicodedata.category(ch).startswith("L")]
    if not letters:
        return None
    return sum(_in_script(ch, script) for ch in letters) / len(letters)


def boxed_answers_match(source_box: str, translated_box: str) -> bool:
    """Whether a translation kept the boxed answer: the same text (spacing aside), the same
    option letter, or the same number.

    Args:
        source_box: The source's last box content.
        translated_box: The translation's last box content.
    """
    if " ".join(source_box.split()) == " ".join(translated_box.split()):
        return True
    if is_choice_gold(source_box):
        return normalize_choice(translated_box) == source_box.strip().upper()
    return numbers_equal(normalize_number(source_box), normalize_number(translated_box))


class LanguageIdentifier:
    """lingua's detector, built once for the languages of a run that it knows.

    Args:
        languages: The run's language codes (those lingua does not know are never named).
    """

    def __init__(self, languages: Iterable[str]):
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

        known = {}
        for code in sorted(set(languages)):
            try:
                known[code] = Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
            except ValueError:
                continue  # not a language lingua knows (e.g. ne): that one is never named
        self._codes = {lang: code for code, lang in known.items()}
        self._detector = (LanguageDetectorBuilder.from_languages(*known.values()).build()
                          if len(known) >= 2 else None)

    def other_language(self, text: str, target: str) -> str | None:
        """The code of another language the text is confidently in.

        Args:
            text: A translated text (its prose; too few words are never judged).
            target: The language it should be in.

        Returns:
            That other language's code, or None.
        """
        words = prose(text).split()
        if self._detector is None or len(words) < MIN_WORDS_FOR_IDENTIFICATION:
            return None
        values = self._detector.compute_language_confidence_values(" ".join(words))
        top = values[0]
        code = self._codes[top.language]
        if code != target and top.value >= MIN_OTHER_CONFIDENCE:
            return code
        return None


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def check_translation(source: str, translation: str, language: str,
                      identifier: LanguageIdentifier | None = None) -> str | None:
    """The rejection reason of one translated text, or None when it passes.

    Args:
        source: The anchor-language text.
        translation: Its translation.
        language: The target language.
        identifier: Tells languages of one script apart (en, sw); None skips that check.

    Returns:
        `empty`, `lost_boxed`, `wrong_boxed`, `wrong_script`, `wrong_language`, `copy`, or None.
    """
    if not translation.strip():
        return "empty"
    source_box = last_boxed(source)
    if source_box is not None:
        translated_box = last_boxed(translation)
        if translated_box is None:
            return "lost_boxed"
        if not boxed_answers_match(source_box, translated_box):
            return "wrong_boxed"
    script = LANGUAGE_SCRIPTS.get(language)
    if script is not None:
        share = script_share(translation, script)
        if share is not None and share < MIN_SCRIPT_SHARE:
            return "wrong_script"
    elif identifier is not None and language in IDENTIFIED_LANGUAGES:
        if identifier.other_language(translation, language) is not None:
            return "wrong_language"
    if _same_text(source, translation) and any(ch.isalpha() for ch in prose(source)):
        return "copy"
    return None


def check_finish_reason(finish_reason: str) -> str | None:
    """The rejection reason a reply's finish reason gives.

    Args:
        finish_reason: The reply's.

    Returns:
        `truncated` (length), `content_filter`, or None.
    """
    if finish_reason == "length":
        return "truncated"
    if finish_reason == "content_filter":
        return "content_filter"
    return None
