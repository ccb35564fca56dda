"""One record of the parallel corpus: a (sample id, language) pair with its chat messages.

A JSON Lines file holds one record per line:

    {"id": "gsm8k-00042", "lang": "hi", "source": "gsm8k", "answer": "72",
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

- `id`: the sample id shared by the anchor and all of its translations (non-empty string).
- `lang`: a language code (`sara_megatron.data.languages`).
- `messages`: an optional leading `system` message, then `user` / `assistant` turns alternating,
  starting with `user` and ending with `assistant`. The prompt is every message before the last;
  the response is the last (assistant) message: the training loss covers only its tokens.
- `source`: where the sample comes from (e.g. "gsm8k", "mmlu-prox"), a non-empty string.
- `answer` (optional): the gold answer (string or number), null or absent where there is none.
Other fields are ignored. The text of these fields must be encodable as UTF-8: JSON can spell a
lone UTF-16 surrogate (`"\\ud83d"`, half an emoji cut off by a truncated translation), which no
tokenizer accepts, so such a record is rejected here rather than crashing the sharding later.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from sara_megatron.tool_errors import UserFacingError

# Files that sit beside a corpus's language files without being corpus records: a folder given as
# the corpus stands for its other *.jsonl files (tools/translate_corpus.py writes its failures there).
TRANSLATION_FAILURES_FILE = "translation_failures.jsonl"
CORPUS_SIDE_FILES = frozenset({TRANSLATION_FAILURES_FILE})

# Reasons a record is rejected; the validation summary counts by these.
INVALID_JSON = "invalid_json"
INVALID_RECORD = "invalid_record"
UNKNOWN_LANGUAGE = "unknown_language"
EMPTY_TEXT = "empty_text"
DUPLICATE = "duplicate"
MISSING_ANCHOR = "missing_anchor"
REJECTION_REASONS = (
    INVALID_JSON, INVALID_RECORD, UNKNOWN_LANGUAGE, EMPTY_TEXT, DUPLICATE, MISSING_ANCHOR
)


class RecordError(UserFacingError, ValueError):
    """A record that cannot be used.

    Args:
        reason: One of REJECTION_REASONS.
        message: What is wrong.
        sample_id: The record's id, when it could be read.
        language: Its language, when it could be read.
    """

    def __init__(self, reason: str, message: str, sample_id: Optional[str] = None,
                 language: Optional[str] = None):
        super().__init__(message)
        self.reason = reason
        self.sample_id = sample_id
        self.language = language


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One message of a record: its role ("system", "user", "assistant") and text."""

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class ParallelRecord:
    """One corpus record: a sample in one language (its messages end with the assistant's
    response; `answer` is the gold answer where the source has one)."""

    sample_id: str
    language: str
    messages: tuple[ChatMessage, ...]
    source: str
    answer: Optional[str] = None

    @property
    def prompt_messages(self) -> tuple[ChatMessage, ...]:
        """Every message but the response."""
        return self.messages[:-1]

    @property
    def response(self) -> ChatMessage:
        """The last message: the assistant's response (the loss is on it)."""
        return self.messages[-1]

    def chat(self, messages: Optional[tuple[ChatMessage, ...]] = None) -> list[dict]:
        """The messages as the dicts `apply_chat_template` takes.

        Args:
            messages: Which messages (default: all of the record's).
        """
        return [{"role": m.role, "content": m.content} for m in (messages or self.messages)]


def _check_roles(roles: list[str]) -> Optional[str]:
    """None when the role sequence is [system?] user (assistant user)* assistant."""
    turns = roles[1:] if roles and roles[0] == "system" else roles
    if len(turns) < 2:
        return "needs at least a user and an assistant message"
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if turns != expected:
        return (f"roles must be [system] user, assistant (alternating, ending with assistant); "
                f"got {roles}")
    return None


def _check_encodable(text: str, field: str, sample_id: Optional[str] = None,
                     language: Optional[str] = None) -> None:
    """Raise INVALID_RECORD when `text` holds a lone surrogate (valid JSON, not valid text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # repr() escapes the surrogate, so the message itself stays writable as UTF-8.
        raise RecordError(
            INVALID_RECORD,
            f"{field} holds a lone UTF-16 surrogate {text[e.start]!r} at character {e.start} "
            "(half of a surrogate pair, e.g. a cut-off emoji): not encodable text",
            sample_id, language,
        ) from None


def parse_record(line: str, known_languages: frozenset[str]) -> ParallelRecord:
    """Parse and check one JSONL line.

    Args:
        line: The line.
        known_languages: The language codes accepted (`languages.known_languages`).

    Returns:
        The `ParallelRecord`.

    Raises:
        RecordError: Naming the first problem.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(INVALID_JSON, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(INVALID_JSON, f"a record must be a JSON object, got {type(obj).__name__}")

    sample_id = obj.get("id")
    language = obj.get("lang")
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise RecordError(INVALID_RECORD, f"'id' must be a non-empty string, got {sample_id!r}")
    # Checked before the id or language is attached to an error: an issue carrying a lone
    # surrogate could not be written to corpus_issues.jsonl.
    _check_encodable(sample_id, "'id'")
    if sample_id != sample_id.strip():
        raise RecordError(INVALID_RECORD, f"'id' has leading/trailing whitespace: {sample_id!r}",
                          sample_id)
    if not isinstance(language, str):
        raise RecordError(INVALID_RECORD, f"'lang' must be a string, got {language!r}", sample_id)
    _check_encodable(language, "'lang'", sample_id)
    if language not in known_languages:
        raise RecordError(
            UNKNOWN_LANGUAGE,
            f"unknown language code {language!r} (known: {', '.join(sorted(known_languages))}; "
            "add codes with --extra-languages)",
            sample_id, language,
        )
    source = obj.get("source")
    if not isinstance(source, str) or not source.strip():
        raise RecordError(INVALID_RECORD, f"'source' must be a non-empty string, got {source!r}",
                          sample_id, language)
    _check_encodable(source, "'source'", sample_id, language)
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RecordError(INVALID_RECORD, f"'answer' must be a string or number, got {answer!r}",
                          sample_id, language)
    if isinstance(answer, str):
        _check_encodable(answer, "'answer'", sample_id, language)

    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list):
        raise RecordError(INVALID_RECORD, "'messages' must be a list of {role, content}",
                          sample_id, language)
    messages = []
    for i, m in enumerate(raw_messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise RecordError(INVALID_RECORD,
                              f"messages[{i}] must be an object with string 'role' and 'content'",
                              sample_id, language)
        _check_encodable(m["role"], f"messages[{i}].role", sample_id, language)
        _check_encodable(m["content"], f"messages[{i}].content", sample_id, language)
        messages.append(ChatMessage(m["role"], m["content"]))
    problem = _check_roles([m.role for m in messages])
    if problem:
        raise RecordError(INVALID_RECORD, problem, sample_id, language)
    for i, m in enumerate(messages):
        if not m.content.strip():
            raise RecordError(EMPTY_TEXT, f"messages[{i}] ({m.role}) has empty text",
                              sample_id, language)
    return ParallelRecord(
        sample_id=sample_id,
        language=language,
        messages=tuple(messages),
        source=source,
        answer=None if answer is None else str(answer),
    )
