"""An evaluation benchmark as a parallel set: items grouped by item id across languages (native
scripts), tokenised as the chat-templated prompt; the divergence tool on an HF folder against
transformers' own router logits, with its suggested range, plot and expert usage."""

import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch

from sara_megatron.analysis.alignment_range import suggest_alignment_range
from sara_megatron.analysis.benchmark_parallel_set import BenchmarkParallelSet
from sara_megatron.analysis.divergence_plots import U_CURVE_SIZE
from sara_megatron.analysis.expert_usage import HEATMAP_HEIGHT, HEATMAP_WIDTH
from sara_megatron.analysis.plotting import png_size
from sara_megatron.data.local_tokenizer import CHATML_TEMPLATE, build_local_tokenizer
from sara_megatron.evaluation.tasks import item_prompt
from sara_megatron.evaluation.benchmarks import load_benchmark
from sara_megatron.kernels.routing_js_reference import js_divergence_from_mean

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"


@pytest.fixture(scope="module")
def shuffled_benchmarks(tmp_path_factory):
    """B's Global-MMLU fixtures with each language's rows shuffled and sw missing one item, so
    groups can only be found by id."""
    root = tmp_path_factory.mktemp("benchmarks")
    (root / "global_mmlu").mkdir()
    for language in ("en", "hi", "sw", "bn"):
        lines = (FIXTURES / "global_mmlu" / f"{language}.jsonl").read_text("utf-8").splitlines()
        random.Random(language).shuffle(lines)
        if language == "sw":
            lines = lines[1:]
        (root / "global_mmlu" / f"{language}.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    return root


class CharTokenizer:
    """One id per character: the ids decode back to the exact text (a reference for what the
    set feeds the model)."""

    chat_template = CHATML_TEMPLATE

    def __init__(self):
        self.ids: dict[str, int] = {}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        from jinja2 import Template

        return Template(self.chat_template).render(messages=messages,
                                                   add_generation_prompt=add_generation_prompt)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.ids.setdefault(c, len(self.ids)) for c in text]}

    def decode(self, ids):
        chars = {i: c for c, i in self.ids.items()}
        return "".join(chars[i] for i in ids)


def test_benchmark_items_group_by_id_with_native_scripts(shuffled_benchmarks):
    tokenizer = CharTokenizer()
    data = BenchmarkParallelSet(tokenizer, "global_mmlu", "en", ["hi", "sw", "bn"],
                                data_dir=str(shuffled_benchmarks))
    assert data.group_counts() == {"hi": 3, "sw": 2, "bn": 3}
    anchor = {s.group_id: s for s in data.sequences("en")}
    for language, script in (("hi", "\u0900-\u097f"), ("bn", "\u0980-\u09ff")):
        items = {i.item_id: i for i in load_benchmark("global_mmlu", language,
                                                      str(shuffled_benchmarks))}
        for sequence in data.sequences(language):
            assert sequence.group_id in anchor
            text = tokenizer.decode(data.tokens(sequence))
            prompt = item_prompt(items[sequence.group_id])
            assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            assert items[sequence.group_id].question in text
            assert any(script[0] <= c <= script[-1] for c in text)  # the native script kept
            assert sequence.prompt_length == len(data.tokens(sequence))
    cut = BenchmarkParallelSet(tokenizer, "global_mmlu", "en", ["hi"],
                               data_dir=str(shuffled_benchmarks), seq_length=20, limit=2)
    assert cut.seq_length == 20 and len(cut.sequences("hi")) == 2
    assert all(len(cut.tokens(s)) == 20 for s in cut.sequences("hi"))
    with pytest.raises(ValueError, match="anchor"):
        BenchmarkParallelSet(tokenizer, "global_mmlu", "en", ["en"], data_dir=str(shuffled_benchmarks))


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory, shuffled_benchmarks):
    from sara_megatron.demo import write_tiny_hf_model

    root = tmp_path_factory.mktemp("hf_model")
    texts = [line for lang in ("en", "hi", "sw", "bn")
             for line in (shuffled_benchmarks / "global_mmlu" / f"{lang}.jsonl").read_text("utf-8").splitlines()]
    build_local_tokenizer(texts, root / "tokenizer", vocab_size=200)
    write_tiny_hf_model(root / "hf", root / "tokenizer")
    return root / "hf"


def transformers_sequence_means(model, token_ids):
    """[L, N] mean over tokens of the softmax of transformers' router logits."""
    with torch.no_grad():
        out = model(torch.as_tensor(token_ids)[None], output_router_logits=True)
    return torch.stack([torch.softmax(logits.float(), -1).mean(0) for logits in out.router_logits])


@pytest.mark.multiprocess
def test_divergence_tool_on_a_benchmark_and_an_hf_folder(tmp_path, tiny_hf_model, shuffled_benchmarks):
    env = launch.environment()
    out = tmp_path
    proc = subprocess.run(
        [*launch.tool("routing_divergence"), "--benchmark", "global_mmlu",
         "--languages", "hi,sw", "--data-dir", str(shuffled_benchmarks), "--checkpoint",
         str(tiny_hf_model), "--json", str(out / "d.json"), "--plot", str(out / "u.png"),
         "--expert-usage", str(out / "usage.json"), "--usage-plots", str(out / "usage"),
         "--usage-layers", "1,3", "--range-alpha", "0.6", "--range-window", "1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "d.json").read_text())
    assert result["layers"] == [0, 1, 2, 3] and result["anchor"] == "en"
    assert result["source"]["groups"] == {"hi": 3, "sw": 2}

    # Reference: transformers' model on the same prompt ids, JS per group, mean over groups.
    from sara_megatron.data.chat_tokenization import load_tokenizer

    data = BenchmarkParallelSet(load_tokenizer(tiny_hf_model), "global_mmlu", "en", ["hi", "sw"],
                                data_dir=str(shuffled_benchmarks))
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    means = {(s.language, s.group_id): transformers_sequence_means(model.eval(), data.tokens(s))
             for lang in ("en", "hi", "sw") for s in data.sequences(lang)}
    for language in ("hi", "sw"):
        groups = [s.group_id for s in data.sequences(language)]
        p = torch.stack([means["en", g] for g in groups])
        q = torch.stack([means[language, g] for g in groups])
        js = js_divergence_from_mean(p, q, torch.ones(p.shape[:2])).mean(0)
        assert torch.allclose(torch.tensor(result["divergence"][language], dtype=torch.float64),
                              js, rtol=2e-3, atol=1e-6), (language, result["divergence"][language], js)
        entropy = lambda d: -(d.double() * d.double().log()).sum(-1)  # noqa: E731
        normalized = (js_divergence_from_mean(p, q, torch.ones(p.shape[:2]))
                      / (0.5 * (entropy(p) + entropy(q)))).mean(0)
        assert torch.allclose(torch.tensor(result["normalized_divergence"][language],
                                           dtype=torch.float64), normalized, rtol=2e-3, atol=1e-6)
    assert max(max(v) for v in result["divergence"].values()) > 1e-4  # routing differs at all

    found = suggest_alignment_range([0, 1, 2, 3], result["divergence"], alpha=0.6, window=1)
    suggested = result["suggested_range"]
    assert (suggested["first_layer"], suggested["last_layer"]) == (found.first_layer, found.last_layer)
    assert (suggested["alpha"], suggested["window"]) == (0.6, 1)
    assert f"suggested alignment range: layers {found.first_layer}..{found.last_layer}" in proc.stdout
    assert png_size(out / "u.png") == U_CURVE_SIZE

    usage = json.loads((out / "usage.json").read_text())
    assert usage["languages"] == ["en", "hi", "sw"] and usage["top_k"] == 2
    for language in usage["languages"]:
        for layer_row in usage["mean_probability"][language]:
            assert sum(layer_row) == pytest.approx(1.0, abs=1e-5)
        for layer_row in usage["selection_frequency"][language]:
            assert sum(layer_row) == pytest.approx(2.0, abs=1e-5)
    en_layer1 = torch.stack([means["en", s.group_id][1] for s in data.sequences("en")]).mean(0)
    assert usage["mean_probability"]["en"][1] == pytest.approx(en_layer1.tolist(), abs=1e-4)
    assert sorted(os.listdir(out / "usage")) == ["expert_usage_layer1.png", "expert_usage_layer3.png"]
    assert png_size(out / "usage" / "expert_usage_layer3.png") == (HEATMAP_WIDTH, HEATMAP_HEIGHT)


def test_divergence_tool_refuses_bad_benchmark_flags(tmp_path, tiny_hf_model, monkeypatch, capsys):
    tool = importlib.import_module("sara_megatron.cli.routing_divergence")
    base = ["routing_divergence.py", "--checkpoint", str(tiny_hf_model), "--benchmark", "global_mmlu"]
    for extra, message in ((["--languages", "hi", "--range-window", "2"], "--range-window"),
                           (["--languages", "hi", "--range-alpha", "-0.1"], "alpha must be in"),
                           ([], "--benchmark needs --languages"),
                           (["--languages", "hi", "--usage-plots", str(tmp_path)], "--expert-usage"),
                           (["--languages", "hi", "--layers", "0-1", "--usage-layers", "3"],
                            "--usage-layers [3] are not among"),
                           (["--languages", "hi", "--data-dir", str(tmp_path)],
                            "no global_mmlu/en.jsonl there")):
        monkeypatch.setattr(sys, "argv", base + extra)
        with pytest.raises(SystemExit) as exit_info:
            tool.parse_args()
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [*base[:-1], "mgsm", "--languages", "sw,hi"])
    with pytest.raises(SystemExit):
        tool.parse_args()
    assert "mgsm has no language 'hi'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", base + ["--languages", "hi", "ne"])
    args = tool.parse_args()
    assert args.languages == ["hi", "ne"] and args.tokenizer == str(tiny_hf_model)
    assert args.model == str(tiny_hf_model)
