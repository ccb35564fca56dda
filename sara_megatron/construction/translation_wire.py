"""The translation request on the chat-completions wire, and how its reply is read.

Any OpenAI-compatible server can play the translator, a rule-based test double included:

- the system message holds the instructions: source and target language (a line
  `Target language: <name> (<code>)` that a program can read), what to keep unchanged, the
  shape of the reply, and, on a retry, why the previous reply was rejected;
- the user message holds only the content: the text itself when the request carries one message,
  or a JSON object whose string values are the texts when it carries several messages of one
  interaction (keys `"0_user"`, `"1_assistant"`, ...);
- the reply is the translation in the same shape. Structured output may be requested
  (`response_format`), but the reply is parsed the same way without it: a JSON object, also inside
  a Markdown code fence.
"""

from __future__ import annotations

import json
import re

from sara_megatron.data.languages import LANGUAGE_NAMES

# Bump when the instructions change: the reply cache keys on it.
PROMPT_VERSION = "translate-v2"
TARGET_LINE = re.compile(r"^Target language: .*\(([A-Za-z0-9-]+)\)\s*$", re.M)

_SCRIPT_RULES = {
    "hi": "Write in the Devanagari script.", "ne": "Write in the Devanagari script.",
    "bn": "Write in the Bengali script.", "te": "Write in the Telugu script.",
    "zh": "Write in Simplified Chinese characters.",
}
_RETRY_NOTES = {
    "empty": "it was empty",
    "truncated": "it was cut off before the end; translate all of it, without adding anything",
    "content_filter": "it was stopped by a content filter; translate the text faithfully and neutrally",
    "lost_boxed": "the final answer {box} was missing; copy it exactly as it is",
    "wrong_boxed": "the final answer was changed; copy {box} exactly as it is",
    "wrong_script": "it was not written in the script of {name}",
    "wrong_language": "it was not written in {name}",
    "copy": "it repeated the source text instead of translating it",
    "unparsable_reply": "it was not {shape}",
}


def language_name(code: str) -> str:
    """The English name of a language code ("hi" -> "Hindi"); the code itself when unknown.

    Args:
        code: An ISO 639-1 code.
    """
    return LANGUAGE_NAMES.get(code, code)


def message_key(index: int, role: str) -> str:
    """The key of a record's message in a request: `<index>_<role>` (e.g. `0_user`).

    Args:
        index: The message's position in the record.
        role: Its role.
    """
    return f"{index}_{role}"


def system_instructions(source_language: str, target_language: str, keys: list[str] | None,
                        rejection: str | None = None, boxed: str | None = None) -> str:
    """The system message of a translation request.

    Args:
        source_language: The anchor language's code.
        target_language: The target language's code (named in a `Target language:` line the
            server side reads back, `read_request`).
        keys: The JSON keys when several texts travel together, else None (plain text).
        rejection: Why the previous attempt was rejected (a stricter retry names it), or None.
        boxed: The source's box content, named when the rejection was a lost or wrong box.

    Returns:
        The instructions, one rule a line.
    """
    target = language_name(target_language)
    shape = (f"a JSON object with exactly the keys {', '.join(json.dumps(k) for k in keys)}, "
             "each value the translation of that key's text" if keys else
             "the translation alone, as plain text")
    lines = [
        f"You are a professional translator. Translate the content of the user message from "
        f"{language_name(source_language)} into {target}.",
        f"Target language: {target} ({target_language})",
        "Rules:",
        "- Translate all natural-language text fluently and faithfully. Do not answer, solve, "
        "summarise, shorten or comment on it.",
        "- Keep unchanged: every \\boxed{...} with its content, numbers, LaTeX math ($...$, "
        "\\(...\\), \\[...\\]), option letters such as A) or (B), code, template slots in "
        "braces such as {question}, and the line breaks and Markdown structure.",
    ]
    if target_language in _SCRIPT_RULES:
        lines.append("- " + _SCRIPT_RULES[target_language])
    if keys:
        lines.append("- The user message is a JSON object whose string values are the texts to "
                     f"translate. Reply with {shape}, and nothing else.")
    else:
        lines.append("- The user message is the text to translate. Reply with the translation "
                     "only, as plain text.")
    if rejection is not None:
        note = _RETRY_NOTES.get(rejection, "it failed a check ({reason})").format(
            box=f"\\boxed{{{boxed}}}" if boxed is not None else "\\boxed{...}", name=target,
            shape=shape, reason=rejection)
        lines.append(f"Your previous translation of this content was rejected: {note}. "
                     "Follow every rule above exactly.")
    return "\n".join(lines)


def user_content(texts: dict[str, str]) -> str:
    """The user message of a request.

    Args:
        texts: key -> source text, in message order.

    Returns:
        One text as itself; several as a JSON object (in the given key order).
    """
    if len(texts) == 1:
        return next(iter(texts.values()))
    return json.dumps(texts, ensure_ascii=False, indent=1)


def response_format(keys: list[str]) -> dict:
    """Structured output for a JSON-shaped request: an object with exactly these string keys.

    Args:
        keys: The request's keys.

    Returns:
        The `response_format` request field (a strict JSON schema).
    """
    return {"type": "json_schema", "json_schema": {
        "name": "translation", "strict": True,
        "schema": {"type": "object", "properties": {k: {"type": "string"} for k in keys},
                   "required": list(keys), "additionalProperties": False}}}


_JSON_ESCAPE_LETTERS = "bfnrtu"
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+)")


def _escape_source_commands(text: str, sources: list[str]) -> str:
    """A model writing JSON by hand often leaves LaTeX's backslash single: `"\\boxed{18}"` is then
    valid JSON for a backspace and `oxed{18}`, `"\\frac"` a form feed, `"\\times"` a tab. Every
    command of the source text (which the translation keeps) that starts with a JSON escape
    letter gets its backslash doubled where it stands single (after an even run of backslashes)."""
    names = {m.group(1) for source in sources for m in _LATEX_COMMAND.finditer(source)}
    for name in sorted((n for n in names if n[0] in _JSON_ESCAPE_LETTERS), key=len, reverse=True):
        pattern = re.compile(r"(?<!\\)((?:\\\\)*)\\" + name + r"(?![A-Za-z])")
        text = pattern.sub(lambda m: m.group(1) + "\\\\" + name, text)
    return text


def parse_reply(content: str, keys: list[str], sources: list[str] | None = None) -> dict[str, str] | None:
    """The translated texts by key, or None when the reply does not have the request's shape.

    Args:
        content: The reply's content.
        keys: The request's keys (one key: the reply is the plain text).
        sources: The source texts, whose LaTeX commands are read as such even when the reply's
            JSON left their backslash single.
    """
    if len(keys) == 1:
        return {keys[0]: content.strip()}
    text = _escape_source_commands(content.strip(), sources or [])
    fenced = re.fullmatch(r"```[A-Za-z]*\s*\n(.*)\n\s*```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        try:
            obj = json.loads(text[start:end + 1]) if 0 <= start < end else None
        except ValueError:
            obj = None
    if not isinstance(obj, dict) or set(obj) != set(keys):
        return None
    if not all(isinstance(v, str) for v in obj.values()):
        return None
    return {k: obj[k] for k in keys}


def read_request(body: dict) -> tuple[str, dict[str, str] | str]:
    """The server side of the contract: what a translation request asks.

    Args:
        body: The chat request's body.

    Returns:
        (target language code, the texts: a dict by key when the user message is a JSON
        object of strings, else the plain text).

    Raises:
        ValueError: A system message without the `Target language:` line.
    """
    messages = body.get("messages", [])
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    match = TARGET_LINE.search(system)
    if match is None:
        raise ValueError("the system message has no 'Target language: <name> (<code>)' line")
    user = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
    try:
        texts = json.loads(user)
    except ValueError:
        return match.group(1), user
    if isinstance(texts, dict) and texts and all(isinstance(v, str) for v in texts.values()):
        return match.group(1), texts
    return match.group(1), user
