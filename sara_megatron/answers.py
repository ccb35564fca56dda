"""Final answers out of model outputs: the last `\\boxed{}` and its normalised value.

One module for the whole project: corpus construction keeps the samples a model answered
correctly, and evaluation scores benchmark outputs, with the same rules.

- `last_boxed(text)`: the content of the last complete `\\boxed{...}` (also `\\boxed {...}` and
  `\\fbox{...}`), with balanced braces (the paper's regex `\\boxed{(.*?)}` cuts
  `\\boxed{\\frac{1}{2}}` at the first `}`). A box left open by a truncated output does not count.
- `normalize_choice(answer, options)`: an option letter "A".."J" from `B`, `(B)`, `B)`, `B.`,
  `\\text{B}`, `\\textbf{(B)}`, `Option B`, `b`, or, with `options`, the text of one option.
- `normalize_number(answer)`: a float from `1,234`, `\\$5`, `25\\%`, `\\frac{1}{2}`, `3/4`, `18.`,
  `\\text{18}`, `18 dollars`, and native digits (Devanagari, Bengali, Telugu, full-width, any
  Unicode decimal digit).
- `numbers_equal(a, b)`: equal within a relative tolerance of 1e-6.
- `answer_is_correct(extracted, gold, options)`: a choice when the gold is a letter A-J, else a
  number (the rule the correctness filter and the scorers share).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Optional, Sequence

CHOICE_LETTERS = "ABCDEFGHIJ"

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Commands whose argument is the answer itself: `\text{B}` is B.
_WRAPPERS = ("text", "textbf", "textit", "textrm", "texttt", "mathrm", "mathbf", "mathit",
             "mbox", "boxed", "fbox", "bf", "emph", "operatorname")
_WRAPPER_START = re.compile(r"\\(" + "|".join(_WRAPPERS) + r")\s*\{")


def _closing_brace(text: str, open_index: int) -> Optional[int]:
    """Index of the `}` closing the `{` at `open_index`, or None when it never closes.
    Escaped braces (`\\{`, `\\}`) are literal characters in LaTeX and do not nest."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: Optional[str]) -> Optional[str]:
    """The content (stripped) of the last complete `\\boxed{...}` / `\\fbox{...}`.

    Boxes inside a box belong to the outer one; an unclosed box (a truncated output) is skipped,
    so an earlier complete box still counts.

    Args:
        text: A model's output (None or empty: no box).

    Returns:
        The box's content, or None when there is no complete box.
    """
    if not text:
        return None
    found = None
    pos = 0
    while True:
        m = _BOX_START.search(text, pos)
        if m is None:
            return found
        end = _closing_brace(text, m.end() - 1)
        if end is None:
            # Unclosed here; a later box may still start inside the unclosed one and close.
            pos = m.end()
            continue
        found = text[m.end():end].strip()
        pos = end + 1


def _strip_outer(s: str) -> str:
    """Peel what surrounds an answer: math delimiters, bold markers, `\\text{}`-like wrappers,
    a bare `{...}` group, a trailing full stop."""
    while True:
        before = s
        s = s.strip()
        for left, right in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$"),
                            ("**", "**")):
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):-len(right)].strip()
        m = _WRAPPER_START.match(s)
        if m and _closing_brace(s, m.end() - 1) == len(s) - 1:
            s = s[m.end():-1]
        elif s.startswith("{") and _closing_brace(s, 0) == len(s) - 1:
            s = s[1:-1]
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1]
        if s == before:
            return s


def _fold_text(s: str) -> str:
    """Text compared loosely: NFKC, case-folded, wrappers peeled, whitespace collapsed."""
    s = _strip_outer(unicodedata.normalize("NFKC", s))
    s = _WRAPPER_START.sub("", s).replace("}", "").replace("{", "")
    return " ".join(s.casefold().split()).rstrip(".")


# "Option B", "Answer: (B)", "The answer is B", "选项 B", "答案：B" -> the part after the words.
_CHOICE_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:correct\s+)?(?:final\s+)?(?:answer|option|choice)\b(?:\s+is)?|选项|答案是?|答案为)"
    r"\s*[:：]?\s*",
    re.IGNORECASE,
)
_INLINE_WRAPPER = re.compile(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{([^{}]*)\}")
_LETTER_ALONE = re.compile(r"^\(?\s*([A-Ja-j])\s*\)?\s*[.:)]?$")
_LETTER_THEN_TEXT = re.compile(r"^\(?([A-J])\s*[).:]\s*(.+)$", re.DOTALL)


def normalize_choice(answer: Optional[str],
                     options: Optional[Sequence[str]] = None) -> Optional[str]:
    """The option letter ("A".."J") an answer names, or None when it names none.

    Args:
        answer: The extracted answer (e.g. a box's content), or None.
        options: The item's option texts, in letter order. With them, letters beyond the last
            option are refused, and an answer that is the text of exactly one option (case,
            spacing and LaTeX wrappers aside) names that option.
    """
    if answer is None:
        return None
    allowed = CHOICE_LETTERS[:len(options)] if options else CHOICE_LETTERS
    s = _strip_outer(unicodedata.normalize("NFKC", answer))
    # Inline wrappers go too: `\text{(C) } \sqrt{2}` reads as `(C)  \sqrt{2}`.
    s = _strip_outer(_INLINE_WRAPPER.sub(lambda m: m.group(1), s))
    full = s
    s = _strip_outer(_CHOICE_PREFIX.sub("", s))
    letter = None
    m = _LETTER_ALONE.match(s)
    if m:
        letter = m.group(1).upper()
    else:
        m = _LETTER_THEN_TEXT.match(s)
        if m:
            letter = m.group(1)
    if letter is not None:
        return letter if letter in allowed else None
    if options:
        folded_options = [_fold_text(option) for option in options]
        for text in (full, s):  # "Paris", or "Answer: Paris"
            matches = [i for i, option in enumerate(folded_options) if option == _fold_text(text)]
            if len(matches) == 1:
                return CHOICE_LETTERS[matches[0]]
        value = normalize_number(s)
        if value is not None:
            numeric = [i for i, option in enumerate(options)
                       if (v := normalize_number(option)) is not None and numbers_equal(v, value)]
            if len(numeric) == 1:
                return CHOICE_LETTERS[numeric[0]]
    return None


def _ascii_digits(s: str) -> str:
    """Every Unicode decimal digit (Devanagari ५, Bengali ৫, Telugu ౫, full-width ５, ...) as 0-9."""
    out = []
    for ch in s:
        if ch.isdigit() and not ("0" <= ch <= "9"):
            d = unicodedata.decimal(ch, None)
            out.append(str(d) if d is not None else ch)
        else:
            out.append(ch)
    return "".join(out)


_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_TEXT_ARG = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_PLAIN = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"^([-+]?)({_PLAIN})$")
_MIXED = re.compile(rf"^([-+]?)(\d+)\s+({_PLAIN})/({_PLAIN})$")  # 3 1/2
_RATIO = re.compile(rf"^([-+]?)({_PLAIN})/([-+]?)({_PLAIN})$")
# 1,234,567 and the Indian 12,34,567; thin/non-breaking spaces as separators: 1 234 567.
_GROUPED_COMMA = re.compile(r"^\d{1,3}(?:,\d{2})*(?:,\d{3})(?:\.\d+)?$")
_GROUPED_SPACE = re.compile(r"^\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_NAME_EQUALS = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")


def _is_word_char(ch: str) -> bool:
    # Letters and combining marks of any script (a Devanagari vowel sign is a mark, not a letter).
    return unicodedata.category(ch)[0] in "LM" or ch in "'’-."


def _drop_unit_words(s: str) -> str:
    """Trailing unit words after a number: "18 dollars", "5cm", "5 सेब" -> the number."""
    tokens = s.split(" ")
    while len(tokens) > 1 and all(_is_word_char(ch) for ch in tokens[-1]):
        tokens.pop()
    last = tokens[-1]
    cut = len(last)
    while cut > 0 and _is_word_char(last[cut - 1]) and last[cut - 1] not in ".-":
        cut -= 1
    if 0 < cut < len(last) and last[cut - 1].isdigit():
        tokens[-1] = last[:cut]
    return " ".join(tokens).rstrip(".").strip()


def _replace_fracs(s: str) -> Optional[str]:
    """`\\frac{a}{b}` -> `a/b` (a mixed `2\\frac{1}{2}` -> `2 1/2`); None when a part is not a
    plain number."""
    def one(m: re.Match) -> str:
        num = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        den = (m.group(3) if m.group(3) is not None else m.group(4)).strip()
        return f" {num}/{den}"
    return _FRAC.sub(one, s)


def _plain_number(s: str) -> Optional[float]:
    if _GROUPED_COMMA.match(s.lstrip("+-")) or _GROUPED_SPACE.match(s.lstrip("+-")):
        s = s.replace(",", "").replace(" ", "")
    m = _NUMBER.match(s)
    if m:
        value = float(m.group(2))
        return -value if m.group(1) == "-" else value
    return None


def normalize_number(answer: Optional[str]) -> Optional[float]:
    """The number an answer states, or None when it is not one number.

    Accepted around the number: `$`, `\\$`, `%`/`\\%` (25% -> 25.0: gold answers are written
    without the sign), `\\text{...}`, a trailing full stop, a leading `x =`, trailing unit words
    (`18 dollars`, `18 \\text{ cm}`); thousands separators (`,` in 3-digit or Indian grouping,
    thin spaces, `{,}`); fractions (`\\frac`, `\\dfrac`, `\\tfrac`, `a/b`, mixed `3 1/2`).

    Args:
        answer: The extracted answer, or None.
    """
    if answer is None:
        return None
    s = _ascii_digits(unicodedata.normalize("NFKC", answer))
    s = _strip_outer(s)
    s = _NAME_EQUALS.sub("", s)
    s = _TEXT_ARG.sub(lambda m: " " + m.group(1) + " ", s)
    s = _replace_fracs(s)
    for token, repl in (("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("{,}", ","),
                        ("\\,", " "), ("\\!", ""), ("\\;", " "), ("\\ ", " "), ("~", " "),
                        ("\u2212", "-"), ("\\left", ""), ("\\right", ""), ("\\cdot", "*"),
                        ("{", ""), ("}", "")):
        s = s.replace(token, repl)
    s = " ".join(s.split())
    s = re.sub(r"^([-+])\s+", r"\1", s)  # "- 5" -> "-5"
    s = s.rstrip(".").strip()
    s = _drop_unit_words(s)
    s = s.replace(" /", "/").replace("/ ", "/")
    value = _plain_number(s)
    if value is not None:
        return value
    m = _MIXED.match(s)
    if m:
        whole, num, den = float(m.group(2)), float(m.group(3)), float(m.group(4))
        if den == 0:
            return None
        value = whole + num / den
        return -value if m.group(1) == "-" else value
    m = _RATIO.match(s)
    if m:
        num, den = float(m.group(2)), float(m.group(4))
        if den == 0:
            return None
        negative = (m.group(1) == "-") != (m.group(3) == "-")
        return -(num / den) if negative else num / den
    return None


def numbers_equal(a: Optional[float], b: Optional[float], rel_tol: float = 1e-6) -> bool:
    """Whether two numbers are equal within a relative tolerance.

    Args:
        a, b: The numbers (None equals nothing).
        rel_tol: Of the larger magnitude (0 equals only 0; NaN equals nothing).
    """
    if a is None or b is None:
        return False
    return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)


def is_choice_gold(gold: str) -> bool:
    """Whether a gold answer is a multiple-choice one: one letter A-J.

    Args:
        gold: The gold answer.
    """
    return len(gold.strip()) == 1 and gold.strip().upper() in CHOICE_LETTERS


def answer_is_correct(extracted: Optional[str], gold: str,
                      options: Optional[Sequence[str]] = None) -> bool:
    """Whether an extracted answer equals the gold answer: option letters when the gold is a
    letter A-J, numbers otherwise.

    Args:
        extracted: The answer found in the output (e.g. `last_boxed(output)`), or None (wrong).
        gold: The gold answer.
        options: The item's option texts, for `normalize_choice`.
    """
    if extracted is None:
        return False
    if is_choice_gold(gold):
        return normalize_choice(extracted, options) == gold.strip().upper()
    return numbers_equal(normalize_number(extracted), normalize_number(gold))
