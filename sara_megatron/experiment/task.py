"""A learnable task with checkable answers, in an anchor and rule-derived target languages.

Two kinds of short reasoning items, each answered in `\\boxed{}`:

- arithmetic word problems (MGSM's columns `question`, `answer_number`): "ana has 3 pens . ana
  buys 4 more pens . how many pens does ana have now ?" -> "3 + 4 = 7 . \\boxed{7}";
- multiple-choice lookups over a small fixed world (Global-MMLU's columns `sample_id`,
  `question`, `option_a..d`, `answer`): each person lives in a city, keeps a pet and likes a colour;
  "where does ana live ?" with four cities -> "ana lives in rome . \\boxed{C}".

`en` is the anchor; `sw`, `bn`, `te` are rule-derived from it (pseudo-words, scripts, word
order), so every translation is exact by construction. Numbers are ASCII digits in every language
(native digits would be a script the base never learns to compute in). The fine-tuning corpus
asks only about the first `TaskSettings.fine_tune_people`; the others are the held-out transfer
set. docs/experiment.md describes the world and the languages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

ANCHOR = "en"
TARGETS = ("sw", "bn", "te")
LANGUAGES = (ANCHOR, *TARGETS)

# Every name the world can use; TaskSettings.people takes the first N.
PEOPLE = ("ana", "ben", "eva", "max", "lia", "sam", "zoe", "tom", "ida", "leo", "mia", "noa",
          "ola", "pia", "rex", "ted", "uma", "val", "wes", "yan", "kai", "jon", "lou", "ray",
          "amy", "bob", "cal", "dan", "eli", "fay", "gus", "hal", "ivy", "jay", "kim", "liz",
          "ned", "oti", "pam", "ros", "sid", "tia", "vic", "ulf")
OBJECTS = ("apples", "books", "coins", "pens", "eggs", "cups")
ATTRIBUTES = {
    "city": ("rome", "oslo", "lima", "cairo"),
    "pet": ("cat", "dog", "fish", "bird"),
    "color": ("red", "blue", "green", "pink"),
}
QUESTION_WORDS = {"city": ("where", "does", "{p}", "live", "?"),
                  "pet": ("which", "pet", "does", "{p}", "have", "?"),
                  "color": ("which", "color", "does", "{p}", "like", "?")}
FACT_WORDS = {"city": ("{p}", "lives", "in", "{v}", "."),
              "pet": ("{p}", "has", "a", "{v}", "."),
              "color": ("{p}", "likes", "{v}", ".")}
# Arithmetic stories: sentences of words; {a} {b} numbers, {p} {q} people, {o} an object.
STORIES = {
    "buys": ((("{p}", "has", "{a}", "{o}", "."), ("{p}", "buys", "{b}", "more", "{o}", "."),
              ("how", "many", "{o}", "does", "{p}", "have", "now", "?")), "+"),
    "gives": ((("{p}", "has", "{a}", "{o}", "."), ("{p}", "gives", "{b}", "{o}", "to", "{q}", "."),
               ("how", "many", "{o}", "does", "{p}", "have", "now", "?")), "-"),
    "together": ((("{p}", "has", "{a}", "{o}", "and", "{q}", "has", "{b}", "{o}", "."),
                  ("how", "many", "{o}", "do", "they", "have", "together", "?")), "+"),
}
FUNCTION_WORDS = ("has", "buys", "more", "how", "many", "does", "have", "now", "gives", "to",
                  "and", "do", "they", "together", "where", "live", "which", "pet", "color",
                  "like", "lives", "in", "a", "likes")
LEXICON_WORDS = tuple(dict.fromkeys(
    FUNCTION_WORDS + PEOPLE + OBJECTS + tuple(v for vs in ATTRIBUTES.values() for v in vs)))

# Consonant-vowel syllables: Latin for sw; the same sounds as Bengali / Telugu aksharas.
_CONSONANTS = ("k", "m", "n", "p", "r", "s", "t", "l", "b", "d")
_VOWELS = ("a", "i", "u", "o")
_SCRIPT = {
    "bn": {"consonants": "কমনপরসতলবদ", "vowel_signs": ("া", "ি", "ু", "ো")},
    "te": {"consonants": "కమనపరసతలబద", "vowel_signs": ("ా", "ి", "ు", "ొ")},
}


def _pseudo_words(language: str) -> dict[str, str]:
    """English word -> a distinct 2-3 syllable word of `language`, seeded by the language."""
    rng = random.Random(f"sara-experiment-lexicon-{language}")
    used, lexicon = set(), {}
    for word in LEXICON_WORDS:
        while True:
            syllables = [(rng.randrange(len(_CONSONANTS)), rng.randrange(len(_VOWELS)))
                         for _ in range(rng.choice((2, 3)))]
            if tuple(syllables) not in used:
                break
        used.add(tuple(syllables))
        if language in _SCRIPT:
            script = _SCRIPT[language]
            text = "".join(script["consonants"][c] + script["vowel_signs"][v]
                           for c, v in syllables)
        else:
            text = "".join(_CONSONANTS[c] + _VOWELS[v] for c, v in syllables)
        lexicon[word] = text
    return lexicon


_LEXICONS = {lang: _pseudo_words(lang) for lang in TARGETS}


def _number(value: int, language: str) -> str:
    return str(value)  # ASCII digits in every language (the module docstring says why)


def render_sentence(words, language: str, slots: dict) -> str:
    """One sentence rendered in `language`: the lexicon and word-order rule of a target applied.

    Args:
        words: A tuple of words ending in "." or "?"; "{name}" words are slots.
        language: A code of `LANGUAGES`.
        slots: name -> value for the slots (ints are written as numbers).

    Returns:
        The sentence, words separated by spaces.
    """
    filled = []
    for word in words:
        if word.startswith("{"):
            value = slots[word[1:-1]]
            filled.append(_number(value, language) if isinstance(value, int) else value)
        else:
            filled.append(word)
    if language == ANCHOR:
        return " ".join(filled)
    body, end = [_LEXICONS[language].get(w, w) for w in filled[:-1]], filled[-1]
    if language == "sw":
        body = body[::-1]
    elif language == "te" and len(body) > 1:
        body = body[1:] + body[:1]
    return " ".join(body + [end])


def render_text(sentences, language: str, slots: dict) -> str:
    """The sentences rendered in `language` (`render_sentence`), joined by spaces.

    Args:
        sentences: Word tuples, one per sentence.
        language: A code of `LANGUAGES`.
        slots: name -> value for the slots.
    """
    return " ".join(render_sentence(s, language, slots) for s in sentences)


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One item, language-independent: rendered per language by `question`, `response`.

    Attributes:
        item_id: The item's id.
        kind: "math" or "lookup".
        sentences: The question's word tuples.
        slots: Sorted (name, value) pairs filling the sentences.
        answer: The number, or the option letter.
        options: Lookups: the four option values (English words).
        fact: Lookups: the fact sentence; math: (a, op, b, result).
    """
    item_id: str
    kind: str  # "math" | "lookup"
    sentences: tuple
    slots: tuple  # sorted (name, value) pairs
    answer: str  # the number, or the option letter
    options: tuple = ()  # lookups: the four option values (English words)
    fact: tuple = ()  # lookups: the fact sentence; math: (a, op, b, result)

    def question(self, language: str) -> str:
        """The question's text in `language`.

        Args:
            language: A code of `LANGUAGES`.
        """
        return render_text(self.sentences, language, dict(self.slots))

    def option_texts(self, language: str) -> tuple[str, ...]:
        """The four options' words in `language` (empty for arithmetic).

        Args:
            language: A code of `LANGUAGES`.
        """
        return tuple(render_sentence((o, "."), language, {})[:-2] for o in self.options)

    def response(self, language: str) -> str:
        """A short worked answer, then the box (a letter, or the number in the language's digits).

        Args:
            language: A code of `LANGUAGES`.
        """
        if self.kind == "math":
            a, op, b, result = self.fact
            work = " ".join((_number(a, language), op, _number(b, language), "=",
                             _number(result, language), "."))
            return f"{work} \\boxed{{{_number(result, language)}}}"
        return f"{render_sentence(self.fact, language, dict(self.slots))} \\boxed{{{self.answer}}}"


def world_people(settings: "TaskSettings") -> tuple[str, ...]:
    """The world's people: the first `settings.people` names.

    Args:
        settings: The task's settings.
    """
    return PEOPLE[:settings.people]


def fine_tune_people(settings: "TaskSettings") -> tuple[str, ...]:
    """The people whose facts the fine-tuning corpus asks about in every language.

    Args:
        settings: The task's settings.
    """
    return PEOPLE[:settings.fine_tune_people]


def held_out_people(settings: "TaskSettings") -> tuple[str, ...]:
    """The others: their facts reach a target language only through the anchor.

    Args:
        settings: The task's settings.
    """
    return PEOPLE[settings.fine_tune_people:settings.people]


def world_facts(seed: int = 0, people: int = len(PEOPLE)) -> dict[str, dict[str, str]]:
    """person -> attribute -> value: the world every lookup asks about (fixed by `seed`), for the
    first `people` names.

    Args:
        seed: The world's seed.
        people: How many of `PEOPLE` the world has.

    Returns:
        person -> attribute -> value; each value held by as many people as the others (give or
        take one).
    """
    rng = random.Random(f"sara-experiment-world-{seed}")
    names = PEOPLE[:people]
    facts = {p: {} for p in names}
    for attribute, values in ATTRIBUTES.items():
        # Each value held by as many people as the others (one more for some when the number of
        # people is not a multiple of four): no answer is right by its frequency alone.
        assignment = [values[i % len(values)] for i in range(len(names))]
        rng.shuffle(assignment)
        for person, value in zip(names, assignment):
            facts[person][attribute] = value
    return facts


def math_item(item_id: str, rng: random.Random, max_operand: int,
              people=PEOPLE[:8]) -> TaskItem:
    """One arithmetic story; its people are the first eight names whatever the world's size.

    Args:
        item_id: The item's id.
        rng: The random stream the story, people, object and operands are drawn from.
        max_operand: The largest operand (operands are 1..max_operand; a difference is never
            negative).
        people: The names the story's two people are drawn from.

    Returns:
        The arithmetic `TaskItem`.
    """
    story = rng.choice(sorted(STORIES))
    sentences, op = STORIES[story]
    p, q = rng.sample(people, 2)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    slots = {"p": p, "q": q, "o": rng.choice(OBJECTS), "a": a, "b": b}
    return TaskItem(item_id, "math", sentences, tuple(sorted(slots.items())), str(result),
                    fact=(a, op, b, result))


def lookup_item(item_id: str, person: str, attribute: str, facts: dict) -> TaskItem:
    """The question about one fact; the options are the attribute's four values in a fixed order,
    so the answer letter is knowledge of the fact (not a search of the options).

    Args:
        item_id: The item's id.
        person: The person asked about.
        attribute: A key of `ATTRIBUTES`.
        facts: The world (`world_facts`).
    """
    value = facts[person][attribute]
    options = ATTRIBUTES[attribute]
    slots = {"p": person, "v": value}
    return TaskItem(item_id, "lookup", (QUESTION_WORDS[attribute],), tuple(sorted(slots.items())),
                    "ABCD"[options.index(value)], options=tuple(options),
                    fact=FACT_WORDS[attribute])


def lookup_items(settings: "TaskSettings", split: str, copies: int = 1,
                 people=None) -> list[TaskItem]:
    """Every (person, attribute) question about `people` (default: the whole world), `copies`
    times (distinct ids).

    Args:
        settings: The task's settings (the world's seed and size).
        split: The split's name, part of each id.
        copies: How many times each question appears.
        people: The people asked about (default: the whole world).

    Returns:
        The lookup `TaskItem`s, copy by copy, person by person, attribute by attribute.
    """
    facts = world_facts(settings.world_seed, settings.people)
    people = world_people(settings) if people is None else people
    return [lookup_item(f"{split}-lookup-{p}-{a}" + (f"-{k}" if copies > 1 else ""), p, a, facts)
            for k in range(copies) for p in people for a in sorted(ATTRIBUTES)]


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """Everything the items depend on (part of the base model's cache key).

    Attributes:
        seed: The seed of the arithmetic items' random streams.
        max_operand: The largest arithmetic operand.
        world_seed: The seed of the world's facts.
        people: The world's size (at most `len(PEOPLE)`).
        fine_tune_people: How many of them the fine-tuning corpus asks about.

    Raises:
        ValueError: Not 0 < fine_tune_people < people <= len(PEOPLE).
    """
    seed: int = 0
    max_operand: int = 9
    world_seed: int = 0
    people: int = 44  # 44 x 3 facts: 36 x 3 = 108 held out with 8 fine-tuning people
    fine_tune_people: int = 8

    def __post_init__(self):
        if not 0 < self.fine_tune_people < self.people <= len(PEOPLE):
            raise ValueError(f"the world needs 0 < fine_tune_people < people <= {len(PEOPLE)}, "
                             f"got {self.fine_tune_people} and {self.people}")


def _item_key(item: TaskItem) -> str:
    return repr((item.kind, item.sentences, item.slots, item.options))


def math_items(settings: TaskSettings, count: int, split: str,
               exclude: set | None = None) -> list[TaskItem]:
    """`count` distinct arithmetic items for `split` (its own random stream), skipping any whose
    content is in `exclude` (the held-out items' keys), so they never appear in training.

    Args:
        settings: The task's settings.
        count: How many items.
        split: The split's name (seeds its random stream; part of each id).
        exclude: Item keys (`item_keys`) to skip.

    Returns:
        The arithmetic `TaskItem`s.

    Raises:
        ValueError: `count` distinct items cannot be drawn.
    """
    rng = random.Random(f"sara-experiment-{settings.seed}-math-{split}")
    items, seen = [], set(exclude or ())
    attempts = 0
    while len(items) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct arithmetic items for {split}")
        item = math_item(f"{split}-math-{len(items):05d}", rng, settings.max_operand)
        key = _item_key(item)
        if key in seen:
            continue
        seen.add(key)
        items.append(item)
    return items


def item_keys(items) -> set:
    """The content keys of `items` (kind, sentences, slots, options; not the id), for `exclude`.

    Args:
        items: `TaskItem`s.
    """
    return {_item_key(i) for i in items}


def fingerprint(*parts) -> str:
    """A short stable hash (16 hex digits) of the parts' repr, for cache keys.

    Args:
        *parts: The values hashed.
    """
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
