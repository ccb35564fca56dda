"""The paper's prompt templates (Appendix A.7, Tables 8, 9 and 10), word for word in English.

Evaluation uses them, and so does corpus construction when it asks a model to answer. A template
is plain text with named slots; only the slots below are filled, so the braces of `\\boxed{}` (and
any braces in a question) are left alone:

    {question} {options} {passage}           the item's text; {options} is the "A) ..." block
    {option_count} {option_letters}          "four", "A, B, C, D" for the paper's four options

With four options the English multiple-choice template renders exactly the paper's Table 8 (and
Table 9 for BELEBELE). MMLU-ProX has up to ten options (A-J): the count and letters follow.

The paper translated the instructions into each target language with GPT-5 mini; those
translations are not published. `load_templates(path)` reads translated templates from a JSON file
(see `docs/evaluation.md`), which `--template-language native` then uses. The project ships English.
"""

from __future__ import annotations

import json
import os
import re
import string
from typing import Mapping, Sequence

# Bump whenever a template's text changes: caches of model replies key on it.
PROMPT_VERSION = "paper-a7-v1"

TEMPLATE_KINDS = ("multiple_choice", "passage", "math")
OPTION_LETTERS = string.ascii_uppercase[:10]  # A-J (MMLU-ProX has ten options)

MULTIPLE_CHOICE_TEMPLATE = (
    "Below is a single-choice question with {option_count} options ({option_letters}). "
    "Only one option is correct.\n"
    "\n"
    "Question:\n"
    "{question}\n"
    "\n"
    "Options:\n"
    "{options}\n"
    "\n"
    "Analyze the question carefully and answer it. At the end of your response, clearly indicate "
    "your final answer by enclosing the correct choice in \\boxed{}."
)

PASSAGE_TEMPLATE = (
    "Below is a passage followed by a single-choice question with {option_count} options "
    "({option_letters}). Only one option is correct based on the passage.\n"
    "\n"
    "Passage:\n"
    "{passage}\n"
    "\n"
    "Question:\n"
    "{question}\n"
    "\n"
    "Options:\n"
    "{options}\n"
    "\n"
    "Analyze the passage and question carefully and answer. At the end of your response, clearly "
    "indicate your final answer by enclosing the correct choice in \\boxed{}."
)

MATH_TEMPLATE = (
    "Below is a question.\n"
    "\n"
    "Question:\n"
    "{question}\n"
    "\n"
    "Please analyze the question and solve it. At the end of your response, clearly indicate your "
    "final answer by enclosing it in \\boxed{}."
)

ENGLISH_TEMPLATES: dict[str, str] = {
    "multiple_choice": MULTIPLE_CHOICE_TEMPLATE,
    "passage": PASSAGE_TEMPLATE,
    "math": MATH_TEMPLATE,
}

# Slots each kind must contain (a translation that drops one would silently lose the question).
REQUIRED_SLOTS = {
    "multiple_choice": ("question", "options"),
    "passage": ("passage", "question", "options"),
    "math": ("question",),
}
_SLOT = re.compile(r"\{(question|options|passage|option_count|option_letters)\}")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten"}


def format_options(options: Sequence[str]) -> str:
    """The options as the paper writes them: one per line, "A) text".

    Args:
        options: 2 to 10 option texts, in letter order.

    Raises:
        ValueError: Fewer than 2 or more than 10 options.
    """
    if not 2 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"a question needs 2 to {len(OPTION_LETTERS)} options, got {len(options)}")
    return "\n".join(f"{letter}) {text}" for letter, text in zip(OPTION_LETTERS, options))


def _fill(template: str, slots: Mapping[str, str]) -> str:
    # One pass over the template: a value that itself contains "{question}" is not filled again.
    return _SLOT.sub(lambda m: slots.get(m.group(1), m.group(0)), template)


def _template(kind: str, template_language: str, templates: Mapping | None) -> str:
    if template_language == "en" and templates is None:
        return ENGLISH_TEMPLATES[kind]
    if templates is None:
        raise ValueError(
            f"no {template_language!r} templates loaded: pass templates=load_templates(path) "
            "(the project ships English only)")
    try:
        return templates[template_language][kind]
    except KeyError:
        if template_language == "en":
            return ENGLISH_TEMPLATES[kind]
        raise ValueError(
            f"the templates file has no {kind!r} template for language {template_language!r}"
        ) from None


def _option_slots(options: Sequence[str], template_language: str) -> dict[str, str]:
    options_block = format_options(options)
    count = len(options)
    # English spells the count as the paper does ("four"); other languages get digits unless their
    # template writes the count itself.
    count_text = _NUMBER_WORDS[count] if template_language == "en" else str(count)
    return {
        "options": options_block,
        "option_count": count_text,
        "option_letters": ", ".join(OPTION_LETTERS[:count]),
    }


def multiple_choice_prompt(question: str, options: Sequence[str], template_language: str = "en",
                           templates: Mapping | None = None) -> str:
    """The multiple-choice prompt, Table 8 (Global-MMLU; MMLU-ProX with up to ten options).

    Args:
        question: The question.
        options: 2 to 10 option texts, in letter order.
        template_language: The template's language ("en", or one of `templates`).
        templates: Translated templates (`load_templates`); None: the English ones.

    Returns:
        The prompt text (it asks for the letter in `\\boxed{}`).

    Raises:
        ValueError: A bad number of options, or no template for the language.
    """
    slots = {"question": question, **_option_slots(options, template_language)}
    return _fill(_template("multiple_choice", template_language, templates), slots)


def passage_prompt(passage: str, question: str, options: Sequence[str],
                   template_language: str = "en", templates: Mapping | None = None) -> str:
    """The reading prompt, Table 9 (BELEBELE: a FLORES passage, then the question).

    Args:
        passage: The passage.
        question: The question.
        options: 2 to 10 option texts, in letter order.
        template_language: The template's language ("en", or one of `templates`).
        templates: Translated templates (`load_templates`); None: the English ones.

    Returns:
        The prompt text.

    Raises:
        ValueError: A bad number of options, or no template for the language.
    """
    slots = {"passage": passage, "question": question, **_option_slots(options, template_language)}
    return _fill(_template("passage", template_language, templates), slots)


def math_prompt(question: str, template_language: str = "en",
                templates: Mapping | None = None) -> str:
    """The math prompt, Table 10 (MGSM, GSM8K).

    Args:
        question: The question.
        template_language: The template's language ("en", or one of `templates`).
        templates: Translated templates (`load_templates`); None: the English ones.

    Returns:
        The prompt text (it asks for the number in `\\boxed{}`).

    Raises:
        ValueError: No template for the language.
    """
    return _fill(_template("math", template_language, templates), {"question": question})


def validate_templates(templates: Mapping) -> None:
    """Check a templates object.

    Args:
        templates: language -> {kind: text}.

    Raises:
        ValueError: Not that shape, an unknown kind, a text without its kind's slots or
            without `\\boxed{}`.
    """
    if not isinstance(templates, Mapping) or not templates:
        raise ValueError("templates must be a non-empty object: language -> {kind: template}")
    for language, kinds in templates.items():
        if not isinstance(kinds, Mapping):
            raise ValueError(f"templates[{language!r}] must be an object of {TEMPLATE_KINDS}")
        for kind, text in kinds.items():
            if kind not in TEMPLATE_KINDS:
                raise ValueError(f"templates[{language!r}]: unknown kind {kind!r} "
                                 f"(known: {', '.join(TEMPLATE_KINDS)})")
            if not isinstance(text, str):
                raise ValueError(f"templates[{language!r}][{kind!r}] must be a string")
            present = set(_SLOT.findall(text))
            missing = [slot for slot in REQUIRED_SLOTS[kind] if slot not in present]
            if missing:
                raise ValueError(f"templates[{language!r}][{kind!r}] lacks the slot(s) "
                                 + ", ".join("{" + s + "}" for s in missing))
            if "\\boxed{}" not in text:
                raise ValueError(f"templates[{language!r}][{kind!r}] must ask for \\boxed{{}}")


# The English templates as an anchor corpus for `tools/translate_corpus.py`: one sample per kind,
# the template as both turns (a corpus sample needs an assistant turn).
TEMPLATE_CORPUS_SOURCE = "prompt-templates"
_TEMPLATE_ID_PREFIX = "prompt-template-"


def templates_corpus_records() -> list[dict]:
    """The English templates as corpus records, one a kind, the template as both turns."""
    return [{"id": _TEMPLATE_ID_PREFIX + kind, "lang": "en", "source": TEMPLATE_CORPUS_SOURCE,
             "messages": [{"role": "user", "content": text},
                          {"role": "assistant", "content": text}]}
            for kind, text in ENGLISH_TEMPLATES.items()]


def write_templates_corpus(path: str | os.PathLike) -> None:
    """Write the English templates as a corpus JSONL that tools/translate_corpus.py translates.

    Args:
        path: The JSONL file written.
    """
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in templates_corpus_records():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def templates_from_corpus(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The templates in a translate_corpus output folder.

    Args:
        folder: The folder (its `<lang>.jsonl` files are read).

    Returns:
        language -> kind -> text.

    Raises:
        ValueError: A line that is not JSON, or no template record at all.
    """
    templates: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{name}:{line_number}: not JSON") from None
                if not isinstance(record, dict) or record.get("source") != TEMPLATE_CORPUS_SOURCE:
                    continue
                kind = str(record.get("id", ""))[len(_TEMPLATE_ID_PREFIX):]
                messages = record.get("messages") or [{}]
                if kind in TEMPLATE_KINDS and isinstance(messages[0].get("content"), str):
                    templates.setdefault(str(record.get("lang")), {})[kind] = \
                        messages[0]["content"]
    if not templates:
        raise ValueError(f"no {TEMPLATE_CORPUS_SOURCE!r} records in the .jsonl files of {folder}")
    return templates


def load_templates(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read translated templates: a JSON file {"templates": {"hi": {"multiple_choice": ...}}}
    (a bare {"hi": {...}} object too), or the output folder of tools/translate_corpus.py run on
    `write_templates_corpus`'s file. English is added when missing.

    Args:
        path: The JSON file or the folder.

    Returns:
        language -> kind -> text, checked by `validate_templates`.

    Raises:
        ValueError: Unreadable JSON or templates that do not pass `validate_templates`.
    """
    if os.path.isdir(path):
        templates = templates_from_corpus(path)
    else:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: not JSON: {e}") from None
        templates = data.get("templates", data) if isinstance(data, dict) else data
    try:
        validate_templates(templates)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None
    merged = {"en": dict(ENGLISH_TEMPLATES)}
    for language, kinds in templates.items():
        merged.setdefault(language, {}).update(kinds)
    return merged
