"""The paper's prompt templates (Appendix A.7, Tables 8-10), compared with the paper's own text."""

import json
import re

import launch
import pytest

from sara_megatron.prompts import (
    PROMPT_VERSION, load_templates, math_prompt, multiple_choice_prompt, passage_prompt,
)

# The paper's Tables 8, 9 and 10 as printed (Appendix A.7), placeholders included.
PAPER_TABLE_8 = """Below is a single-choice question with four options (A, B, C, D). Only one option is correct.

Question:
{question}

Options:
A) {A}
B) {B}
C) {C}
D) {D}

Analyze the question carefully and answer it. At the end of your response, clearly indicate your final answer by enclosing the correct choice in \\boxed{}."""

PAPER_TABLE_9 = """Below is a passage followed by a single-choice question with four options (A, B, C, D). Only one option is correct based on the passage.

Passage:
{flores_passage}

Question:
{question}

Options:
A) {A}
B) {B}
C) {C}
D) {D}

Analyze the passage and question carefully and answer. At the end of your response, clearly indicate your final answer by enclosing the correct choice in \\boxed{}."""

PAPER_TABLE_10 = """Below is a question.

Question:
{question}

Please analyze the question and solve it. At the end of your response, clearly indicate your final answer by enclosing it in \\boxed{}."""


@pytest.mark.parametrize("expected, render", [
    (PAPER_TABLE_8, lambda: multiple_choice_prompt("{question}", ["{A}", "{B}", "{C}", "{D}"])),
    (PAPER_TABLE_9, lambda: passage_prompt("{flores_passage}", "{question}",
                                           ["{A}", "{B}", "{C}", "{D}"])),
    (PAPER_TABLE_10, lambda: math_prompt("{question}")),
])
def test_templates_are_the_papers_word_for_word(expected, render):
    assert render() == expected


def test_multiple_choice_prompt_fills_options_and_keeps_braces():
    prompt = multiple_choice_prompt("Is \\frac{1}{2} > {question}?", ["yes", "no", "maybe", "x"])
    assert "Question:\nIs \\frac{1}{2} > {question}?\n" in prompt  # a value is not filled again
    assert "Options:\nA) yes\nB) no\nC) maybe\nD) x\n" in prompt
    assert "four options (A, B, C, D)" in prompt
    assert prompt.endswith("enclosing the correct choice in \\boxed{}.")


def test_ten_options_for_mmlu_prox():
    options = [f"o{i}" for i in range(10)]
    prompt = multiple_choice_prompt("q", options)
    assert "ten options (A, B, C, D, E, F, G, H, I, J)" in prompt
    assert "\nJ) o9\n" in prompt
    with pytest.raises(ValueError, match="2 to 10 options"):
        multiple_choice_prompt("q", options + ["o10"])


def test_native_templates_from_file(tmp_path):
    hi = {
        "multiple_choice": "नीचे {option_count} विकल्पों ({option_letters}) वाला प्रश्न है।\n"
                           "प्रश्न:\n{question}\nविकल्प:\n{options}\nउत्तर \\boxed{} में लिखें।",
        "passage": "अनुच्छेद:\n{passage}\nप्रश्न:\n{question}\nविकल्प:\n{options}\n\\boxed{}",
        "math": "प्रश्न:\n{question}\nअंतिम उत्तर \\boxed{} में लिखें।",
    }
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"prompt_version": PROMPT_VERSION, "templates": {"hi": hi}},
                               ensure_ascii=False), encoding="utf-8")
    templates = load_templates(path)
    prompt = multiple_choice_prompt("७ गुणा ८?", ["54", "56", "64", "48"], "hi", templates)
    assert prompt.startswith("नीचे 4 विकल्पों (A, B, C, D) वाला प्रश्न है।")
    assert "A) 54\nB) 56" in prompt
    assert math_prompt("२+२?", "hi", templates) == "प्रश्न:\n२+२?\nअंतिम उत्तर \\boxed{} में लिखें।"
    # English stays available and is the paper's text.
    assert math_prompt("q", "en", templates) == math_prompt("q")
    with pytest.raises(ValueError, match="'sw'"):
        math_prompt("q", "sw", templates)
    with pytest.raises(ValueError, match="no 'hi' templates loaded"):
        math_prompt("q", "hi")


def test_a_translation_that_drops_a_slot_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"hi": {"math": "प्रश्न \\boxed{}"}}), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("lacks the slot(s) {question}")):
        load_templates(path)
    path.write_text(json.dumps({"hi": {"math": "{question}"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="boxed"):
        load_templates(path)


@pytest.mark.multiprocess
def test_templates_translated_by_translate_corpus(tmp_path):
    """The English templates go through tools/translate_corpus.py (against a stand-in translator
    on 127.0.0.1 that writes Devanagari words and keeps slots and \\boxed{}) and come back as
    native templates."""
    import subprocess

    from sara_megatron.chat.server import LocalChatServer
    from sara_megatron.construction.translation_wire import read_request
    from sara_megatron.prompts import write_templates_corpus

    english_word = re.compile(r"(?<![\\{A-Za-z])[A-Za-z]+(?![A-Za-z}])")

    def translate(text):  # every English word -> a Hindi word; {slots}, \boxed{}, A) stay
        return english_word.sub(lambda m: m.group(0) if len(m.group(0)) == 1 else "शब्द", text)

    def translator(body):
        language, texts = read_request(body)
        assert language == "hi"
        if isinstance(texts, dict):
            return json.dumps({k: translate(v) for k, v in texts.items()}, ensure_ascii=False)
        return translate(texts)

    write_templates_corpus(tmp_path / "templates_en.jsonl")
    with LocalChatServer(translator) as server:
        proc = subprocess.run(
            [*launch.tool("translate_corpus"), "--input",
             str(tmp_path / "templates_en.jsonl"), "--languages", "hi", "--output",
             str(tmp_path / "translated"), "--model", "translator", "--base-url", server.base_url],
            capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    templates = load_templates(tmp_path / "translated")
    prompt = multiple_choice_prompt("७ गुणा ८?", ["54", "56", "64", "48"], "hi", templates)
    assert "Question" not in prompt and "शब्द" in prompt
    assert "७ गुणा ८?" in prompt and "A) 54\nB) 56\nC) 64\nD) 48" in prompt
    assert "\\boxed{}" in prompt and " 4 शब्द (A, B, C, D)" in prompt
    assert math_prompt("q", "en", templates) == math_prompt("q")
