"""Answer extraction over real-looking model outputs: the last complete box, then a choice or a
number, as the corpus filter and the benchmark scorers read them."""

import math
import re

import pytest

from sara_megatron.answers import (
    answer_is_correct,
    last_boxed,
    normalize_choice,
    normalize_number,
    numbers_equal,
)

# (model output, content of its last complete box or None)
BOXED_CASES = [
    ("Half of the pie is left, so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("First guess \\boxed{12}; recomputing, 3 + 4 * 3 = 15, so \\boxed{15}.", "15"),
    ("The store sells 48 clips in total. Final answer: 72", None),
    ("Therefore the final answer is \\boxed {72}", "72"),
    ("The answer is \\fbox{B}", "B"),
    ("Answer: \\boxed{3}. Let me double check: \\boxed{\\frac{1}{2", "3"),  # cut by the length limit
    ("\\boxed{\\text{(C) } \\sqrt{2}}", "\\text{(C) } \\sqrt{2}"),
    ("The set is \\boxed{\\{1, 2\\}}.", "\\{1, 2\\}"),  # escaped braces do not nest
    ("\\boxed{\\boxed{5}}", "\\boxed{5}"),  # the inner box belongs to the outer one
    ("उत्तर है \\boxed{४२}।", "४२"),
    ("答案是 \\boxed{ B }。", "B"),
    ("\\boxed{}", ""),
    ("", None),
    ("The word boxed{5} without a backslash", None),
]


@pytest.mark.parametrize("output,expected", BOXED_CASES)
def test_last_boxed(output, expected):
    assert last_boxed(output) == expected


def paper_regex(output):
    """The paper's extraction (Appendix A.7), for contrast."""
    found = re.findall(r"\\boxed{(.*?)}", output)
    return found[-1] if found else None


def test_balanced_parsing_fixes_the_paper_regex_on_fractions():
    output = "So the probability is \\boxed{\\frac{1}{2}}."
    assert paper_regex(output) == "\\frac{1"
    assert normalize_number(paper_regex(output)) is None
    assert normalize_number(last_boxed(output)) == 0.5


# (boxed content, value or None)
NUMBER_CASES = [
    ("72", 72.0),
    ("1,234", 1234.0),
    ("12,34,567", 1234567.0),  # Indian grouping, as hi/bn outputs write it
    ("1{,}000", 1000.0),
    ("1\\,000", 1000.0),
    ("\\$18", 18.0),
    ("$18.00$", 18.0),
    ("\\$1,000.50", 1000.5),
    ("25\\%", 25.0),
    ("25%", 25.0),
    ("\\frac{1}{2}", 0.5),
    ("\\dfrac{3}{4}", 0.75),
    ("\\tfrac12", 0.5),
    ("-\\frac{1}{2}", -0.5),
    ("2\\frac{1}{2}", 2.5),
    ("3/4", 0.75),
    ("3 1/2", 3.5),
    ("18.", 18.0),
    ("\\text{18}", 18.0),
    ("18 \\text{ dollars}", 18.0),
    ("\\textbf{42}", 42.0),
    ("5 रुपये", 5.0),
    ("5cm", 5.0),
    ("x = 4", 4.0),
    ("−7", -7.0),  # U+2212 minus sign
    ("- 7", -7.0),
    ("0.5", 0.5),
    (".5", 0.5),
    ("१२३", 123.0),  # Devanagari (hi, ne)
    ("१,२३४", 1234.0),
    ("৪২", 42.0),  # Bengali
    ("౧౦", 10.0),  # Telugu
    ("１２", 12.0),  # full-width
    ("\\boxed{5}", 5.0),
    ("1,5", None),  # a decimal comma or a typo: not guessed
    ("1,000,00", None),
    ("1/0", None),
    ("5 and 6", None),
    ("B", None),
    ("", None),
    ("\\sqrt{2}", None),
]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_normalize_number(text, expected):
    got = normalize_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected, rel_tol=1e-12)


CHOICE_OPTIONS = ["London", "Paris", "Rome", "Berlin"]
# (boxed content, letter without options, letter with CHOICE_OPTIONS)
CHOICE_CASES = [
    ("B", "B", "B"),
    ("(B)", "B", "B"),
    ("B)", "B", "B"),
    ("B.", "B", "B"),
    ("\\text{B}", "B", "B"),
    ("\\textbf{(B)}", "B", "B"),
    ("Option B", "B", "B"),
    ("b", "B", "B"),
    ("The answer is (C)", "C", "C"),
    ("选项B", "B", "B"),
    ("答案：D", "D", "D"),
    ("（B）", "B", "B"),  # full-width parentheses
    ("Ｂ", "B", "B"),  # full-width letter
    ("B) Paris", "B", "B"),
    ("\\text{(C) } \\sqrt{2}", "C", "C"),
    ("\\textbf{Answer:} \\text{D}", "D", "D"),
    ("J", "J", None),  # beyond the fourth option
    ("K", None, None),
    ("Paris", None, "B"),
    ("\\text{paris}.", None, "B"),
    ("Answer: Rome", None, "C"),
    ("Madrid", None, None),
    ("Optional", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text,plain,with_options", CHOICE_CASES)
def test_normalize_choice(text, plain, with_options):
    assert normalize_choice(text) == plain
    assert normalize_choice(text, CHOICE_OPTIONS) == with_options


def test_choice_by_number_when_options_are_numbers():
    options = ["12", "1,500", "3/4", "7"]
    assert normalize_choice("1500", options) == "B"
    assert normalize_choice("\\frac{3}{4}", options) == "C"
    assert normalize_choice("8", options) is None


def test_numbers_equal_is_relative():
    assert numbers_equal(1e9, 1e9 + 100)  # 1e-7 relative
    assert not numbers_equal(1e9, 1e9 + 10_000)  # 1e-5 relative
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert not numbers_equal(0.0, 1e-12)
    assert numbers_equal(0.0, -0.0)
    assert not numbers_equal(float("nan"), float("nan"))
    assert not numbers_equal(None, 1.0)


# (full model output, gold, options, correct?)
GRADING_CASES = [
    ("Natalia sold 48/2 = 24 clips in May, 48 + 24 = 72 in all. \\boxed{72}", "72", None, True),
    ("... so she earns \\boxed{\\$10}.", "10", None, True),
    ("The total is \\boxed{1,080}", "1080", None, True),
    ("कुल \\boxed{१०८०} रुपये", "1080", None, True),
    ("I first thought \\boxed{70} but it is 72.", "72", None, False),  # the box is what counts
    ("The answer is 72.", "72", None, False),
    ("Among the options, \\boxed{\\textbf{(B)}} is right.", "B", ["x", "y", "z"], True),
    ("\\boxed{C}", "B", None, False),
    ("The capital is \\boxed{Paris}", "B", CHOICE_OPTIONS, True),
]


@pytest.mark.parametrize("output,gold,options,correct", GRADING_CASES)
def test_answer_is_correct(output, gold, options, correct):
    assert answer_is_correct(last_boxed(output), gold, options) is correct
