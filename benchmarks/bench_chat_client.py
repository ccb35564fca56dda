"""Throughput of the chat client against the local OpenAI-wire server (a benchmark, not a test).

    python benchmarks/bench_chat_client.py [--latency-ms 50] [--concurrency 1,16,64] [--json out.json]

The server (`sara_megatron.chat.server.LocalChatServer`, in its own process so that it does not
share the client's interpreter lock) answers every chat request after `--latency-ms`. For each
concurrency c the client sends enough requests to keep c in flight for a while and reports
requests per second against the ideal c / latency (target: at least 80 % of it). The client
overhead per request is the time per request at concurrency 1 minus the added latency, and,
measured without any latency, the time one request takes end to end (client, HTTP, server) and the
client process's CPU time per request.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time


def _serve(latency_s: float, port_queue, stop_event) -> None:
    from sara_megatron.chat.server import LocalChatServer

    with LocalChatServer(lambda body: "ok " + body["messages"][-1]["content"][:16],
                         latency_s=latency_s) as server:
        port_queue.put(server.port)
        stop_event.wait()


class ServerProcess:
    def __init__(self, latency_s: float):
        ctx = mp.get_context("spawn")
        self._ports, self._stop = ctx.Queue(), ctx.Event()
        self._process = ctx.Process(target=_serve, args=(latency_s, self._ports, self._stop), daemon=True)

    def __enter__(self) -> str:
        self._process.start()
        return f"http://127.0.0.1:{self._ports.get(timeout=120)}/v1"

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._process.join(timeout=10)


async def _measure(base_url: str, concurrency: int, requests: int) -> dict:
    from sara_megatron.chat.client import ChatClient, ChatSettings

    settings = ChatSettings("bench", temperature=0.0, max_tokens=16)
    client = ChatClient(base_url, concurrency=concurrency)
    try:
        # Warm up the connection pool so that connects are not counted.
        await asyncio.gather(*(client.complete([{"role": "user", "content": "warm"}], settings)
                               for _ in range(concurrency)))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client.complete([{"role": "user", "content": f"request {i}"}], settings)
                               for i in range(requests)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await client.aclose()
    return {"concurrency": concurrency, "requests": requests, "seconds": elapsed,
            "requests_per_s": requests / elapsed, "ms_per_request": 1e3 * elapsed / requests,
            "client_cpu_ms_per_request": 1e3 * cpu / requests}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--seconds", type=float, default=3.0, help="about how long each level runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "bench-key-local-server")
    latency = args.latency_ms / 1e3
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with ServerProcess(latency) as base_url:
        for c in levels:
            ideal = c / latency
            n = max(c * 4, int(ideal * args.seconds))
            row = asyncio.run(_measure(base_url, c, n))
            row["ideal_requests_per_s"] = ideal
            row["share_of_ideal"] = row["requests_per_s"] / ideal
            row["meets_80_percent"] = row["share_of_ideal"] >= 0.8
            rows.append(row)
            print(f"concurrency {c:3d}: {row['requests_per_s']:8.1f} req/s of ideal {ideal:7.1f} "
                  f"({100 * row['share_of_ideal']:5.1f} %{'' if row['meets_80_percent'] else ', BELOW 80 %'}); "
                  f"client CPU {row['client_cpu_ms_per_request']:.2f} ms/request", flush=True)
    with ServerProcess(0.0) as base_url:
        bare = asyncio.run(_measure(base_url, 1, 300))
    at_one = next((r for r in rows if r["concurrency"] == 1), None)
    overhead = {
        "end_to_end_ms_without_latency": bare["ms_per_request"],
        "client_cpu_ms_per_request": bare["client_cpu_ms_per_request"],
        "ms_over_latency_at_concurrency_1": None if at_one is None else
        at_one["ms_per_request"] - args.latency_ms,
    }
    print(f"overhead per request: {overhead['end_to_end_ms_without_latency']:.2f} ms end to end "
          f"without latency (client CPU {overhead['client_cpu_ms_per_request']:.2f} ms)"
          + ("" if at_one is None else
             f"; {overhead['ms_over_latency_at_concurrency_1']:.2f} ms over the latency at concurrency 1"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"latency_ms": args.latency_ms, "levels": rows, "overhead": overhead}, f, indent=1)


if __name__ == "__main__":
    main()
