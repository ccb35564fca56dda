"""Our lm-eval task definitions: lm-eval's own filter + scoring on fixed replies agrees, reply by
reply, with what our runner writes for the same replies (no model, no download)."""

import asyncio
import os
from pathlib import Path

import pytest

from sara_megatron.chat.server import LocalChatServer
from sara_megatron.evaluation import LM_EVAL_TASKS_DIR
from sara_megatron.evaluation.backends import OpenAIBackend, SamplingSettings
from sara_megatron.evaluation.benchmarks import BENCHMARK_LANGUAGES, item_from_row
from sara_megatron.evaluation.records import read_item_records
from sara_megatron.evaluation.runner import EvaluationPlan, EvaluationRunner
from sara_megatron.evaluation.tasks import item_prompt

pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
LANGUAGES = ("hi", "sw", "zh")


def replies_for(item):
    """Replies a model might give: right, wrong, the option's text, nested braces, native digits,
    no box, a box cut off, two boxes (the last counts)."""
    if item.options:
        right, wrong = item.gold, "ABCD"[("ABCD".index(item.gold) + 1) % 4]
        option_text = item.options["ABCD".index(item.gold)]
        return [f"... \\boxed{{{right}}}", f"\\boxed{{{wrong}}}",
                f"The answer is \\boxed{{\\text{{{option_text}}}}}", f"\\boxed{{({right})}}",
                "I cannot decide.", f"\\boxed{{{right}}} then \\boxed{{{wrong}}}",
                f"\\boxed{{{wrong}}} no, \\boxed{{{right}}}", f"\\boxed{{{right}"]
    gold = int(item.gold)
    native = str(gold).translate(str.maketrans("0123456789", "০১২৩৪৫৬৭৮৯"))
    return [f"\\boxed{{{gold}}}", f"\\boxed{{{gold + 1}}}", f"\\boxed{{\\frac{{{2 * gold}}}{{2}}}}",
            f"\\boxed{{{native}}}", f"so {gold}", f"\\boxed{{{gold}.00}}",
            f"\\boxed{{{gold}}} and \\boxed{{7}}", f"\\boxed{{{gold} apples}}"]


def lm_eval_task(name, language):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=LM_EVAL_TASKS_DIR, include_defaults=False)
    data = os.fspath(FIXTURES / name / f"{language}.jsonl")
    # Our YAML with the hub dataset swapped for the local fixture file (same columns).
    cfg = manager._factory._load_full_config(
        manager._entry(f"sara_{name}_{language}"),
        {"dataset_path": "json", "dataset_name": None,
         "dataset_kwargs": {"data_files": {"test": data}}})
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return ConfigurableTask(config=cfg)


def test_tasks_are_indexed_under_their_tags():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=LM_EVAL_TASKS_DIR, include_defaults=False)
    for name, languages in BENCHMARK_LANGUAGES.items():
        assert f"sara_{name}" in manager.all_tags
        assert {f"sara_{name}_{lang}" for lang in languages} <= set(manager.all_tasks)
    assert "sara_mgsm_hi" not in manager.all_tasks


def lm_eval_scores(name, language, reply_index):
    task = lm_eval_task(name, language)
    task.build_all_requests(rank=0, world_size=1)
    scores, prompts = {}, {}
    for inst in task.instances:
        item = item_from_row(name, language, inst.doc, index=inst.doc_id)
        prompt, generation_kwargs = inst.args
        assert generation_kwargs["do_sample"] is True
        assert generation_kwargs["temperature"] == 0.1 and generation_kwargs["top_p"] == 1.0
        inst.resps = [replies_for(item)[reply_index]]
        prompts[item.item_id] = prompt
    task.apply_filters()
    for inst in task.instances:
        item = item_from_row(name, language, inst.doc, index=inst.doc_id)
        [filtered] = inst.filtered_resps.values()
        scores[item.item_id] = task.process_results(inst.doc, [filtered])["exact_match"]
    return scores, prompts


@pytest.mark.parametrize("reply_index", range(8))
def test_lm_eval_and_our_runner_score_the_same_replies_alike(tmp_path, reply_index):
    benchmarks = tuple(BENCHMARK_LANGUAGES)

    def responder(body):
        return body_replies[body["messages"][0]["content"]]

    body_replies, expected, ours_prompts = {}, {}, {}
    for name in benchmarks:
        for lang in LANGUAGES:
            if lang not in BENCHMARK_LANGUAGES[name]:
                continue
            scores, prompts = lm_eval_scores(name, lang, reply_index)
            for item_id, score in scores.items():
                expected[(name, lang, item_id)] = score
            ours_prompts.update({(name, lang, k): v for k, v in prompts.items()})
    from sara_megatron.evaluation.benchmarks import load_benchmark

    for name in benchmarks:
        for lang in LANGUAGES:
            if lang in BENCHMARK_LANGUAGES[name]:
                for item in load_benchmark(name, lang, data_dir=FIXTURES):
                    prompt = item_prompt(item)
                    assert ours_prompts[(name, lang, item.item_id)] == prompt  # same question
                    body_replies[prompt] = replies_for(item)[reply_index]
    with LocalChatServer(responder) as server:
        backend = OpenAIBackend(server.base_url, "m", SamplingSettings(), concurrency=4)
        plan = EvaluationPlan(benchmarks=benchmarks, languages=LANGUAGES, runs=1,
                              data_dir=str(FIXTURES))
        asyncio.run(EvaluationRunner(backend, plan, str(tmp_path), {"model": "m"},
                                     progress=False, say=lambda _: None).run())
    ours = {(r["benchmark"], r["language"], r["item_id"]): float(r["correct"])
            for r in read_item_records(tmp_path / "items.jsonl")}
    assert ours == expected
    if reply_index == 0:  # the right answers: everything correct on both sides
        assert set(ours.values()) == {1.0}
    if reply_index == 1:
        assert set(ours.values()) == {0.0}


def test_lm_eval_evaluator_reports_our_runners_accuracy(tmp_path):
    """lm-eval's whole evaluator (requests, filters, metric, aggregation) on our task with a
    stand-in model gives the accuracy our runner writes into results.json for the same replies."""
    from lm_eval import evaluator
    from lm_eval.api.model import LM

    from sara_megatron.evaluation.benchmarks import load_benchmark
    from sara_megatron.evaluation.records import read_results

    items = load_benchmark("belebele", "hi", data_dir=FIXTURES)
    reply_by_prompt = {item_prompt(item): replies_for(item)[i % 8]
                       for i, item in enumerate(items)}

    class FixedReplies(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [reply_by_prompt[r.args[0]] for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    from lm_eval.tasks import TaskManager

    report = evaluator.simple_evaluate(
        model=FixedReplies(), tasks=[lm_eval_task("belebele", "hi")], bootstrap_iters=0,
        # Only our tasks indexed (lm-eval's own thousands of YAML files take ~25 s).
        task_manager=TaskManager(include_path=LM_EVAL_TASKS_DIR, include_defaults=False))
    lm_eval_accuracy = 100.0 * report["results"]["sara_belebele_hi"]["exact_match,last_boxed"]

    with LocalChatServer(lambda body: reply_by_prompt[body["messages"][0]["content"]]) as server:
        backend = OpenAIBackend(server.base_url, "m", SamplingSettings(), concurrency=2)
        plan = EvaluationPlan(benchmarks=("belebele",), languages=("hi",), runs=1,
                              data_dir=str(FIXTURES))
        asyncio.run(EvaluationRunner(backend, plan, str(tmp_path), {"model": "m"},
                                     progress=False, say=lambda _: None).run())
    ours = read_results(tmp_path)["benchmarks"]["belebele"]["hi"]["mean"]
    assert ours == pytest.approx(lm_eval_accuracy)
    assert 0.0 < ours < 100.0  # the replies mix right and wrong
