"""Benchmark the data path of issue 5 (not a test): prior store reads, the training data loader
with and without priors, and the shard tool's tokens/s at 1 and 2 workers.

    python tools/bench_priors.py --json bench_priors.json

- Prior store: random single reads (`store[id]`, [L, N]) and random batch reads of chosen layers
  (`store.read(ids)`, [L, B, N]) at the Qwen3 shape ([28, 128]), fp32 and bf16. The store is read
  right after it is written, so it sits in the page cache: these are memory-mapped reads from RAM,
  the steady state of a training run whose store fits in memory, not cold-disk figures.
- Data loader: iterate the loader over the target languages (micro-batch 4, seq length 4096,
  synthetic samples of up to ~3000 tokens, no loader workers), without priors and with priors
  of layers 7..34 read from a 48-layer store ([28, 128] per sample) in fp32 and in bf16; runs
  alternate and the best of each is kept.
- Shard tool: tokens/s of tokenizing and writing shards (validation and start-up excluded), with
  a local BPE tokenizer (the real tokenizers need the network); 1 and 2 worker processes.
Everything runs on CPU; say which machine the figures come from when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time

import numpy as np

from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
from sara_megatron.data.local_tokenizer import build_local_tokenizer
from sara_megatron.data.sara_dataset import SaraDataConfig, build_sara_data_loader
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.priors import PriorStore, PriorStoreMetadata, PriorStoreWriter

QWEN_LAYERS, QWEN_EXPERTS = 28, 128


def write_random_store(path, ids, layers, experts, dtype, corpus_fp="bench", shard_rows=2048):
    meta = PriorStoreMetadata(tuple(layers), experts, dtype, "en", "bench-model", corpus_fp)
    writer = PriorStoreWriter(path, meta)
    writer.prepare()
    rng = np.random.default_rng(0)
    for start in range(0, len(ids), shard_rows):
        chunk = ids[start:start + shard_rows]
        p = rng.random((len(chunk), len(layers), experts), dtype=np.float32)
        writer.write_shard(chunk, p / p.sum(-1, keepdims=True))
    writer.finalize(ids)


def timed_loop(fn, seconds):
    """Calls of `fn` per second over about `seconds` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        calls += 100
    return calls / elapsed


def bench_store(root, num_samples, seconds, batch):
    results = {}
    ids = [f"s-{i:07d}" for i in range(num_samples)]
    for dtype, itemsize in (("fp32", 4), ("bf16", 2)):
        path = os.path.join(root, f"store_{dtype}")
        start = time.perf_counter()
        write_random_store(path, ids, range(7, 7 + QWEN_LAYERS), QWEN_EXPERTS, dtype)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        store = PriorStore(path)
        open_s = time.perf_counter() - start
        rng = random.Random(0)
        row_bytes = QWEN_LAYERS * QWEN_EXPERTS * itemsize
        single = timed_loop(lambda: store[ids[rng.randrange(num_samples)]], seconds)
        batched = timed_loop(lambda: store.read(rng.sample(ids, batch)), seconds) * batch
        results[dtype] = {
            "samples": num_samples, "store_mb": num_samples * row_bytes / 1e6,
            "write_s": write_s, "open_and_verify_s": open_s,
            "single_reads_per_s": single, "single_mb_per_s": single * row_bytes / 1e6,
            f"batch{batch}_reads_per_s": batched,
            f"batch{batch}_mb_per_s": batched * row_bytes / 1e6,
        }
        print(f"prior store {dtype} [{QWEN_LAYERS},{QWEN_EXPERTS}] x {num_samples}: "
              f"single {single:,.0f} reads/s ({single * row_bytes / 1e6:,.0f} MB/s), "
              f"batch of {batch} {batched:,.0f} samples/s ({batched * row_bytes / 1e6:,.0f} MB/s); "
              f"open+verify {open_s:.2f}s", flush=True)
    return results


def make_corpus(root, num_samples, languages, max_words, vocab_size):
    paths = write_synthetic_corpus(os.path.join(root, "corpus"), num_samples, languages, max_words)
    build_local_tokenizer(corpus_texts(paths[:1]), os.path.join(root, "tokenizer"), vocab_size)
    return paths


def bench_loader(root, num_samples, seq_length, micro_batch, repeats):
    make_corpus(root, num_samples, ("en", "hi", "sw"), max_words=1400, vocab_size=2000)
    shards_dir = os.path.join(root, "shards")
    shard_corpus(ShardingConfig((os.path.join(root, "corpus"),), shards_dir,
                                os.path.join(root, "tokenizer"), seq_length=seq_length,
                                shard_size=1024))
    shards = TokenShards(shards_dir)
    ids = [s.meta.sample_id for s in shards.samples("en")]
    stores = {"none": None}
    for dtype in ("fp32", "bf16"):
        stores[dtype] = os.path.join(root, f"priors_{dtype}")
        write_random_store(stores[dtype], ids, range(48), QWEN_EXPERTS, dtype,
                           corpus_fp=shards.language_fingerprint("en"))
    mean_tokens = np.mean([s.meta.token_count for s in shards.samples("hi")])

    def samples_per_s(prior_store):
        cfg = SaraDataConfig(shards_dir, prior_store,
                             prior_layers=range(7, 35) if prior_store else None,
                             micro_batch_size=micro_batch, seq_length=seq_length)
        loader = build_sara_data_loader(cfg)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch.sample_ids)
        return n / (time.perf_counter() - start)

    runs = {name: [] for name in stores}
    for _ in range(repeats):  # interleaved, so background load hits all alike
        for name, store in stores.items():
            runs[name].append(samples_per_s(store))
    best = {name: max(r) for name, r in runs.items()}
    result = {"micro_batch": micro_batch, "seq_length": seq_length,
              "mean_tokens_per_sample": float(mean_tokens), "runs": runs,
              "samples_per_s_without_priors": best["none"]}
    line = (f"data loader (micro-batch {micro_batch}, seq {seq_length}, mean {mean_tokens:.0f} "
            f"tokens/sample): {best['none']:,.0f} samples/s without priors")
    for dtype in ("fp32", "bf16"):
        cost = 1 - best[dtype] / best["none"]
        per_sample_us = (1 / best[dtype] - 1 / best["none"]) * 1e6
        result[f"samples_per_s_with_{dtype}_priors"] = best[dtype]
        result[f"prior_cost_fraction_{dtype}"] = cost
        result[f"prior_cost_us_per_sample_{dtype}"] = per_sample_us
        line += (f"; with [28,128] {dtype} priors {best[dtype]:,.0f} "
                 f"(cost {cost * 100:.1f}%, {per_sample_us:.1f} us/sample)")
    print(line, flush=True)
    return result


def bench_shard_tool(root, num_samples, repeats):
    make_corpus(root, num_samples, ("en", "hi", "sw", "bn"), max_words=600, vocab_size=8000)
    results = {}
    for workers in (1, 2):
        rates = []
        for r in range(repeats):
            out = os.path.join(root, f"shards_w{workers}_{r}")
            report = shard_corpus(ShardingConfig(
                (os.path.join(root, "corpus"),), out, os.path.join(root, "tokenizer"),
                seq_length=4096, shard_size=256, workers=workers))
            rates.append(report.tokens_written / report.writing_s)
            shutil.rmtree(out)
        results[f"workers_{workers}"] = {"tokens_per_s": max(rates), "runs": rates,
                                         "tokens": report.tokens_written}
        print(f"shard tool, {workers} worker(s): {max(rates):,.0f} tokens/s "
              f"({report.tokens_written:,} tokens)", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--store-samples", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=3.0, help="per read benchmark")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--loader-samples", type=int, default=1000, help="per language")
    p.add_argument("--shard-samples", type=int, default=1500, help="per language")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", help="default: a temporary directory, removed afterwards")
    args = p.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="bench_priors_")
    try:
        results = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor()},
            "prior_store": bench_store(root, args.store_samples, args.seconds, args.batch),
            "data_loader": bench_loader(os.path.join(root, "loader"), args.loader_samples,
                                        4096, 4, args.repeats),
            "shard_tool": bench_shard_tool(os.path.join(root, "shard"), args.shard_samples,
                                           args.repeats),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
