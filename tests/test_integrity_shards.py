"""Token shards are checked where they are read: damage made on a copy of the test corpus's shards
(a flipped byte, an out-of-vocabulary id, a cut `.bin`, a missing or garbage `.idx`) is refused
naming the file; the sha256 check is remembered for unchanged files (a later open reads nothing)
and is not fooled by a restored modification time; the corpus fingerprint that priors record
comes from the files, so a damaged anchor shard cannot pass for the clean corpus."""

import os
import shutil
import subprocess

import numpy as np
import pytest

import launch


from sara_megatron.data import shard_verification
from sara_megatron.data.shard_verification import ShardDamagedError
from sara_megatron.data.token_shards import TokenShards


@pytest.fixture(autouse=True)
def own_stamp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SARA_VERIFY_CACHE", str(tmp_path / "stamps"))


@pytest.fixture
def shards(sara_data, tmp_path):
    """A copy of the test corpus's shards, free to damage."""
    return shutil.copytree(sara_data["shards"], tmp_path / "shards")


def _flip_in_vocabulary(path, offset=20):
    """Change one uint16 token id to another id of the vocabulary (a silent corruption)."""
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[offset] = (tokens[offset] + 1) % 200
    tokens.tofile(path)


def test_a_flipped_token_is_refused_naming_the_file(shards):
    assert len(TokenShards(shards).samples("hi")) == 64  # the clean copy reads
    _flip_in_vocabulary(shards / "hi" / "hi-00000.bin")
    with pytest.raises(ShardDamagedError, match=r"hi-00000\.bin is damaged: its sha256 differs.*"
                                                r"delete .*hi-00000\.done\.json and re-run "
                                                r"tools/shard_corpus\.py"):
        TokenShards(shards).samples("hi")
    # --no-verify skips the hash only: the structure still holds, so the copy reads.
    assert len(TokenShards(shards, verify=False).samples("hi")) == 64
    with pytest.raises(ShardDamagedError, match="sha256 differs"):
        TokenShards(shards).verify()


@pytest.mark.parametrize("damage, message", [
    ("out_of_vocabulary", r"hi-00000\.bin is damaged: token id 65535 is outside the tokenizer's "
                          r"vocabulary \(0\.\.199\)"),
    ("truncated_bin", r"hi-00000\.bin is damaged: \d+ bytes, but its index points to \d+ "
                      r"\(cut short\)"),
    ("missing_idx", r"hi-00000\.idx is damaged: the file is missing"),
    ("garbage_idx", r"hi-00000\.idx is damaged: not a Megatron index"),
    ("truncated_idx", r"hi-00000\.idx is damaged: \d+ bytes, but its header declares 64 "
                      r"sequences"),
])
def test_structural_damage_is_refused_even_without_verification(shards, damage, message):
    base = shards / "hi" / "hi-00000"
    bin_path, idx_path = base.with_suffix(".bin"), base.with_suffix(".idx")
    if damage == "out_of_vocabulary":
        tokens = np.fromfile(bin_path, dtype=np.uint16)
        tokens[7] = 65535
        tokens.tofile(bin_path)
    elif damage == "truncated_bin":
        os.truncate(bin_path, os.path.getsize(bin_path) - 2)
    elif damage == "missing_idx":
        idx_path.unlink()
    elif damage == "garbage_idx":
        idx_path.write_bytes(b"not an index at all")
    else:
        os.truncate(idx_path, os.path.getsize(idx_path) - 8)
    with pytest.raises(ShardDamagedError, match=message):
        TokenShards(shards, verify=False).samples("hi")


def test_later_opens_read_nothing_and_a_restored_mtime_does_not_fool_the_stamp(shards,
                                                                               monkeypatch):
    TokenShards(shards).verify()  # first open: hashes and remembers
    reads = []
    real_sha = shard_verification.FileStamp.sha256.__globals__["sha256_file"]
    monkeypatch.setitem(shard_verification.FileStamp.sha256.__globals__, "sha256_file",
                        lambda path: reads.append(path) or real_sha(path))
    real_range = shard_verification._token_range
    monkeypatch.setattr(shard_verification, "_token_range",
                        lambda *a: reads.append(a[0]) or real_range(*a))
    again = TokenShards(shards)
    again.verify()
    assert again.language_fingerprint("en") == again.manifest["languages"]["en"]["fingerprint"]
    assert reads == []  # nothing hashed or scanned: the stamp vouched for every file

    # A write that keeps the size and puts the modification time back: the change time moved.
    path = shards / "sw" / "sw-00000.bin"
    st = os.stat(path)
    _flip_in_vocabulary(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ShardDamagedError, match=r"sw-00000\.bin is damaged: its sha256 differs"):
        TokenShards(shards).samples("sw")
    assert str(path) in map(str, reads)


def test_the_corpus_fingerprint_comes_from_the_files(single_rank, sara_data, shards):
    """A damaged anchor shard read without verification yields another fingerprint than the
    manifest's, so priors extracted from it cannot pass for the clean corpus, and training
    (even with data.verify_shards=false) refuses the clean corpus's priors for it."""
    from sara_megatron.priors.store_format import PriorStoreError
    from sara_megatron.training import Trainer, load_train_config
    from test_training import _config_args

    clean = TokenShards(shards, verify=False).language_fingerprint("en")
    assert clean == TokenShards(shards).manifest["languages"]["en"]["fingerprint"]
    _flip_in_vocabulary(shards / "en" / "en-00000.bin")
    damaged = TokenShards(shards, verify=False).language_fingerprint("en")
    assert damaged != clean

    settings = {"data.shards_dir": shards, "data.micro_batch_size": 2,
                "data.global_batch_size": 2, "optim.train_steps": 1}
    with pytest.raises(PriorStoreError, match=rf"different corpus.*fingerprint is {clean}, "
                                              rf"expected {damaged}"):
        Trainer(load_train_config(None, _config_args(
            sara_data, **settings, **{"data.verify_shards": False})))
    with pytest.raises(ShardDamagedError, match=r"en-00000\.bin is damaged"):
        Trainer(load_train_config(None, _config_args(sara_data, **settings)))


@pytest.mark.multiprocess
def test_a_tool_names_the_damaged_shard_in_one_line_and_the_advice_repairs_it(sara_data, shards):
    """routing_divergence.py (one process) on a damaged copy: exit 2 and one line naming the
    file, not a traceback. Deleting the shard's marker and re-running shard_corpus.py, as the
    message says, rewrites it."""
    _flip_in_vocabulary(shards / "sw" / "sw-00000.bin")
    env = launch.environment()
    proc = subprocess.run(
        [*launch.tool("routing_divergence"), "--shards", str(shards),
         "--checkpoint", str(sara_data["checkpoint"]), "--model", "qwen3_moe_tiny",
         "--languages", "sw"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"routing_divergence.py: error: token shard file {shards}/sw/sw-00000.bin "
                      "is damaged: its sha256 differs from the one the manifest recorded when it "
                      f"was written. Rebuild the shard: delete {shards}/sw/sw-00000.done.json and "
                      f"re-run tools/shard_corpus.py with the arguments that wrote {shards} (it "
                      "rewrites that shard only), or shard the corpus again into a new --output"]
    assert "Traceback" not in proc.stderr

    (shards / "sw" / "sw-00000.done.json").unlink()
    from test_shard_corpus import load_tool

    root = sara_data["root"]
    assert load_tool().main(["--corpus", str(root / "corpus"), "--tokenizer",
                             str(root / "tokenizer"), "--output", str(shards),
                             "--anchor-language", "en", "--seq-length", "64"]) == 0
    TokenShards(shards).verify()
