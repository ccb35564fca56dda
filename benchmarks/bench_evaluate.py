"""Throughput of the evaluation runner against the local OpenAI-wire server (a benchmark, not a test).

    python benchmarks/bench_evaluate.py [--latency-ms 200] [--concurrency 32] [--items 1280]

The server (`LocalChatServer`, in its own process so it does not share the runner's interpreter
lock) answers each request after `--latency-ms` with a boxed answer. The runner evaluates
`--items` synthetic MGSM-format items (one language, one run) end to end: prompts, requests,
scoring, items.jsonl written and flushed per item, results.json and table.md. Reported:

- items/s at `--concurrency`, against the ideal concurrency / latency (target: >= 80 % of it);
- the runner's own overhead per item: at concurrency 1 without latency, the wall time per item
  minus the time spent inside the request (prompt, scoring, record writing, bookkeeping), and the
  whole round trip per item (client, HTTP, server) beside it.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time


def _answer(body) -> str:
    return "Reasoning... \\boxed{42}"


def _serve(latency_s: float, port_queue, stop_event) -> None:
    from sara_megatron.chat.server import LocalChatServer

    with LocalChatServer(_answer, latency_s=latency_s) as server:
        port_queue.put(server.port)
        stop_event.wait()


class ServerProcess:
    def __init__(self, latency_s: float):
        ctx = mp.get_context("spawn")
        self._ports, self._stop = ctx.Queue(), ctx.Event()
        self._process = ctx.Process(target=_serve, args=(latency_s, self._ports, self._stop),
                                    daemon=True)

    def __enter__(self) -> str:
        self._process.start()
        return f"http://127.0.0.1:{self._ports.get(timeout=120)}/v1"

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._process.join(timeout=10)


def write_items(data_dir: str, count: int) -> None:
    os.makedirs(os.path.join(data_dir, "mgsm"), exist_ok=True)
    with open(os.path.join(data_dir, "mgsm", "en.jsonl"), "w", encoding="utf-8") as f:
        for i in range(count):
            question = f"Item {i}: a farmer has {i} cows and buys {42 - i % 7} more. " * 4
            f.write(json.dumps({"question": question, "answer_number": 42 if i % 2 else 41}) + "\n")


class TimedBackend:
    """The OpenAI backend, with the time spent inside its requests summed."""

    def __init__(self, inner):
        self.inner, self.model, self.concurrency = inner, inner.model, inner.concurrency
        self.request_s = 0.0

    async def generate(self, messages, seed, language=None):
        start = time.perf_counter()
        try:
            return await self.inner.generate(messages, seed, language)
        finally:
            self.request_s += time.perf_counter() - start

    async def aclose(self):
        await self.inner.aclose()


def measure(base_url: str, data_dir: str, items: int, concurrency: int) -> dict:
    from sara_megatron.evaluation.backends import OpenAIBackend, SamplingSettings
    from sara_megatron.evaluation.runner import EvaluationPlan, EvaluationRunner

    backend = TimedBackend(OpenAIBackend(base_url, "bench", SamplingSettings(),
                                         concurrency=concurrency))
    plan = EvaluationPlan(benchmarks=("mgsm",), languages=("en",), runs=1, data_dir=data_dir,
                          limit=items)
    with tempfile.TemporaryDirectory() as output:
        runner = EvaluationRunner(backend, plan, output, {"model": "bench"}, progress=True,
                                  say=lambda _: None)
        cpu0, start = time.process_time(), time.perf_counter()
        result = asyncio.run(runner.run())
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    assert result["benchmarks"]["mgsm"]["en"]["mean"] == 50.0, result
    return {"items": items, "concurrency": concurrency, "wall_s": wall,
            "items_per_s": items / wall, "cpu_ms_per_item": 1e3 * cpu / items,
            "request_s": backend.request_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--items", type=int, default=1280)
    p.add_argument("--overhead-items", type=int, default=300)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as data_dir:
        write_items(data_dir, max(args.items, args.overhead_items))
        with ServerProcess(args.latency_ms / 1e3) as url:
            measure(url, data_dir, 64, args.concurrency)  # warm-up: imports, connections
            throughput = measure(url, data_dir, args.items, args.concurrency)
        with ServerProcess(0.0) as url:
            measure(url, data_dir, 32, 1)
            overhead = measure(url, data_dir, args.overhead_items, 1)
    ideal = args.concurrency / (args.latency_ms / 1e3)
    n = overhead["items"]
    report = {
        "latency_ms": args.latency_ms, "concurrency": args.concurrency,
        "items_per_s": throughput["items_per_s"], "ideal_items_per_s": ideal,
        "fraction_of_ideal": throughput["items_per_s"] / ideal,
        "runner_overhead_ms_per_item": 1e3 * (overhead["wall_s"] - overhead["request_s"]) / n,
        "round_trip_ms_per_item": 1e3 * overhead["request_s"] / n,
        "cpu_ms_per_item_at_concurrency": throughput["cpu_ms_per_item"],
        "cpu_count": os.cpu_count(),
    }
    print(f"{args.items} items at concurrency {args.concurrency}, {args.latency_ms:.0f} ms replies: "
          f"{report['items_per_s']:.1f} items/s = {100 * report['fraction_of_ideal']:.1f}% of the "
          f"ideal {ideal:.0f} (target >= 80%)")
    print(f"runner overhead {report['runner_overhead_ms_per_item']:.2f} ms/item outside the "
          f"request (concurrency 1, no latency); round trip {report['round_trip_ms_per_item']:.2f} "
          f"ms/item; evaluator CPU {report['cpu_ms_per_item_at_concurrency']:.2f} ms/item")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
