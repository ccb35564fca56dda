"""What integrity costs: first-open verification of token shards and of a checkpoint, per GB, and
the cost of later opens (the stamp vouches for unchanged files).

    python benchmarks/bench_integrity.py --work out/bench_integrity --shard-gb 1 --checkpoint-gb 1

Token shards: random uint16 tokens written as Megatron indexed datasets with a manifest (as
tools/shard_corpus.py writes them), then opened with `TokenShards`:
  - first open, structure only (--no-verify: index sizes, token ids below the vocabulary),
  - first open, verified (structure + sha256 of every file),
  - later open (the stamp remembers both).
Checkpoint: a folder of files of the given total size (checkpoint-sized blobs; what is measured
is hashing, which does not depend on what the bytes mean): the manifest written at save, the first
verified load, a later load. Files are just written, so the page cache is warm: the figures are
hashing and scanning speed, not the disk's (a cold read adds the disk's read time).
Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

VOCAB = 32000
SAMPLE_TOKENS = 1 << 20  # one "document" of 1 Mi tokens: few index entries, the bytes dominate
SHARD_SAMPLES = 64


def write_shards(root: str, total_gb: float) -> float:
    """Shards of random tokens with a manifest; returns the bytes written, in GB."""
    from sara_megatron.data.token_shards import (
        MANIFEST_NAME,
        SHARDS_FORMAT,
        SampleMeta,
        language_fingerprint,
        shard_prefix,
        write_token_shard,
    )

    rng = np.random.default_rng(0)
    samples_total = max(1, int(total_gb * 1e9 / (2 * SAMPLE_TOKENS)))
    markers, index = [], 0
    while index * SHARD_SAMPLES < samples_total:
        count = min(SHARD_SAMPLES, samples_total - index * SHARD_SAMPLES)
        samples = [(SampleMeta(f"s{index}-{i}", "en", 8, SAMPLE_TOKENS, False, "bench"),
                    rng.integers(0, VOCAB, SAMPLE_TOKENS, dtype=np.uint16)) for i in range(count)]
        markers.append(write_token_shard(root, shard_prefix("en", index), samples, np.uint16,
                                         "bench"))
        index += 1
    manifest = {
        "format": SHARDS_FORMAT, "anchor_language": "en", "seq_length": SAMPLE_TOKENS,
        "token_dtype": "uint16", "tokenizer": {"vocab_size": VOCAB},
        "languages": {"en": {"fingerprint": language_fingerprint(markers), "shards": [
            {k: m[k] for k in ("prefix", "samples", "tokens", "sha256")} for m in markers]}},
    }
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    return sum(sum(m["bytes"].values()) for m in markers) / 1e9


def write_checkpoint_files(folder: str, total_gb: float) -> float:
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    chunk = 256 << 20
    left, index = int(total_gb * 1e9), 0
    while left > 0:
        size = min(chunk, left)
        rng.integers(0, 255, size, dtype=np.uint8).tofile(os.path.join(folder, f"__{index}_0.distcp"))
        left -= size
        index += 1
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        f.write("{}")
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--checkpoint-gb", type=float, default=1.0)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="bench_integrity_")
    os.makedirs(work, exist_ok=True)
    os.environ["SARA_VERIFY_CACHE"] = os.path.join(work, "stamps")  # start with no stamps
    from sara_megatron.checkpointing.manifest import verify_checkpoint, write_checkpoint_manifest
    from sara_megatron.file_stamps import stamp_folder
    from sara_megatron.data.token_shards import TokenShards

    results = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor()}"}
    try:
        shards = os.path.join(work, "shards")
        shutil.rmtree(shards, ignore_errors=True)
        gb = write_shards(shards, args.shard_gb)

        def open_all(verify):
            TokenShards(shards, verify=verify).samples("en")

        structure = timed(lambda: open_all(False))
        shutil.rmtree(stamp_folder(), ignore_errors=True)
        first = timed(lambda: open_all(True))
        later = timed(lambda: open_all(True))
        results["shards"] = {"gb": gb, "first_open_structure_only_s": structure,
                             "first_open_verified_s": first, "later_open_s": later,
                             "first_open_verified_s_per_gb": first / gb,
                             "first_open_structure_only_s_per_gb": structure / gb}

        ckpt = os.path.join(work, "checkpoint")
        shutil.rmtree(ckpt, ignore_errors=True)
        gb = write_checkpoint_files(ckpt, args.checkpoint_gb)
        shutil.rmtree(stamp_folder(), ignore_errors=True)
        save = timed(lambda: write_checkpoint_manifest(ckpt, collective=False))
        shutil.rmtree(stamp_folder(), ignore_errors=True)  # a load elsewhere: nothing remembered
        first = timed(lambda: verify_checkpoint(ckpt, collective=False))
        later = timed(lambda: verify_checkpoint(ckpt, collective=False))
        results["checkpoint"] = {"gb": gb, "manifest_at_save_s": save, "first_load_verified_s": first,
                                 "later_load_s": later, "first_load_verified_s_per_gb": first / gb,
                                 "manifest_at_save_s_per_gb": save / gb}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    s, c = results["shards"], results["checkpoint"]
    print(f"machine: {results['machine']} (page cache warm: files just written)")
    print(f"token shards, {s['gb']:.2f} GB: first open {s['first_open_verified_s']:.2f} s "
          f"({s['first_open_verified_s_per_gb']:.2f} s/GB; structure and token ids alone "
          f"{s['first_open_structure_only_s_per_gb']:.2f} s/GB), later open "
          f"{s['later_open_s'] * 1e3:.1f} ms")
    print(f"checkpoint, {c['gb']:.2f} GB: manifest at save {c['manifest_at_save_s']:.2f} s "
          f"({c['manifest_at_save_s_per_gb']:.2f} s/GB), first verified load "
          f"{c['first_load_verified_s']:.2f} s ({c['first_load_verified_s_per_gb']:.2f} s/GB), "
          f"later load {c['later_load_s'] * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
