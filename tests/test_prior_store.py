"""Prior store: round trip (fp32, bf16), batch reads of chosen layers, checksums, fingerprints,
missing ids, resumable writes; bulk reads by global row and the in-memory PriorTable built from
them."""

import json
import pickle

import numpy as np
import pytest
import torch

from sara_megatron.io import canonical_json, sha256_text
from sara_megatron.priors import (
    MissingPriorError,
    PriorStore,
    PriorStoreError,
    PriorStoreMetadata,
    PriorStoreWriter,
    PriorTable,
    parse_layer_selection,
)

LAYERS, EXPERTS = (7, 8, 9, 12), 16


def metadata(dtype="fp32", model="model-a", compute_dtype="fp32"):
    return PriorStoreMetadata(layers=LAYERS, num_experts=EXPERTS, dtype=dtype,
                              anchor_language="en", model_fingerprint=model,
                              corpus_fingerprint="corpus-1", compute_dtype=compute_dtype)


def priors_for(ids):
    """Distinct distributions per sample: each id's prior is seeded by the id."""
    out = []
    for sid in ids:
        g = torch.Generator().manual_seed(int(sid.split("-")[1]))
        out.append(torch.softmax(torch.randn(len(LAYERS), EXPERTS, generator=g) * 3, -1))
    return torch.stack(out).numpy()


IDS = [f"s-{i}" for i in range(10)]


def write_store(path, dtype="fp32", model="model-a", ids=IDS, split=4):
    writer = PriorStoreWriter(path, metadata(dtype, model))
    writer.prepare()
    for start in range(0, len(ids), split):
        chunk = ids[start:start + split]
        writer.write_shard(chunk, priors_for(chunk))
    writer.finalize(ids)
    return path


@pytest.fixture
def store_path(tmp_path):
    return write_store(tmp_path / "store")


def test_round_trip_fp32(store_path):
    store = PriorStore(store_path, expected_model_fingerprint="model-a")
    assert len(store) == 10 and store.layers == LAYERS and store.num_experts == EXPERTS
    expected = priors_for(IDS)
    for i, sid in enumerate(IDS):
        torch.testing.assert_close(store[sid], torch.from_numpy(expected[i]), rtol=0, atol=0)
    batch = ["s-7", "s-0", "s-7", "s-5"]
    got = store.read(batch, layers=[8, 12])  # [L_sel, B, N], non-contiguous layers
    assert got.shape == (2, 4, EXPERTS) and got.dtype == torch.float32
    for b, sid in enumerate(batch):
        row = expected[IDS.index(sid)]
        assert torch.equal(got[:, b], torch.from_numpy(row[[1, 3]]))
    assert torch.equal(store.read(batch, layers=[7, 8, 9])[:, 1], torch.from_numpy(expected[0][:3]))
    assert torch.equal(store.read(batch), torch.from_numpy(expected[[7, 0, 7, 5]]).transpose(0, 1))
    with pytest.raises(PriorStoreError, match=r"layers \[10\] were not recorded"):
        store.read(batch, layers=[9, 10])


def test_round_trip_bf16(tmp_path):
    store = PriorStore(write_store(tmp_path / "bf16", dtype="bf16"))
    want = torch.from_numpy(priors_for(IDS)).to(torch.bfloat16).float()
    assert torch.equal(store.read(IDS).transpose(0, 1), want)
    shard = next((tmp_path / "bf16" / "shards").glob("*.npy"))
    assert np.load(shard).dtype == np.uint16 and shard.stat().st_size < 10 * 4 * 16 * 2 + 200


def test_flipped_byte_is_detected(store_path):
    shard = sorted((store_path / "shards").glob("*.npy"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one prior value
    shard.write_bytes(bytes(data))
    with pytest.raises(PriorStoreError, match=rf"{shard.name} is corrupt"):
        PriorStore(store_path)
    lazy = PriorStore(store_path, verify="lazy")  # opens; fails on first use of that shard
    bad_ids = [sid for sid in IDS if lazy._locate(sid)[0] == 1]
    good_ids = [sid for sid in IDS if sid not in bad_ids]
    lazy.read(good_ids)
    with pytest.raises(PriorStoreError, match="corrupt"):
        lazy[bad_ids[0]]


def test_flipped_byte_in_ids_is_detected(store_path):
    ids_file = sorted((store_path / "shards").glob("*.ids.json"))[0]
    ids_file.write_text(ids_file.read_text().replace('"s-', '"t-', 1))
    with pytest.raises(PriorStoreError, match="corrupt"):
        PriorStore(store_path)


def test_other_model_is_refused(store_path):
    with pytest.raises(PriorStoreError, match="different model: its model fingerprint is "
                                              "model-a, expected model-b"):
        PriorStore(store_path, expected_model_fingerprint="model-b")
    with pytest.raises(PriorStoreError, match="different corpus"):
        PriorStore(store_path, expected_corpus_fingerprint="corpus-2")


def test_missing_sample_id_is_named(store_path):
    store = PriorStore(store_path)
    with pytest.raises(MissingPriorError, match="sample id 'gsm8k-404' has no prior"):
        store["gsm8k-404"]
    with pytest.raises(MissingPriorError, match="'nope'"):
        store.read(["s-1", "nope"])
    assert "s-1" in store and "nope" not in store and store.missing(["s-1", "nope"]) == ["nope"]


def test_interrupted_write_resumes(tmp_path):
    path = tmp_path / "store"
    writer = PriorStoreWriter(path, metadata())
    writer.prepare()
    writer.write_shard(IDS[:4], priors_for(IDS[:4]))
    # A kill: a torn temporary file and a shard whose ids never made it to disk.
    (path / "shards" / "prior-x.npy.partial").write_bytes(b"torn")
    np.save(path / "shards" / "prior-orphan.npy", priors_for(IDS[4:6]))
    with pytest.raises(PriorStoreError, match="incomplete"):
        PriorStore(path)

    again = PriorStoreWriter(path, metadata())
    again.prepare()
    assert sorted(p.name for p in (path / "shards").iterdir())[0].startswith("prior-")
    assert not list((path / "shards").glob("*orphan*")) and not list(path.rglob("*.partial"))
    assert again.finished_sample_ids() == set(IDS[:4])
    with pytest.raises(PriorStoreError, match=r"6 sample\(s\) without a prior"):
        again.finalize(IDS)
    again.write_shard(IDS[4:], priors_for(IDS[4:]))
    again.finalize(IDS)
    want = torch.from_numpy(priors_for(IDS))
    assert torch.equal(PriorStore(path).read(IDS).transpose(0, 1), want)

    with pytest.raises(PriorStoreError, match="model_fingerprint: 'model-a' vs 'model-b'"):
        PriorStoreWriter(path, metadata(model="model-b")).prepare()


def test_compute_precision_is_recorded_and_never_mixed(tmp_path):
    path = tmp_path / "store"
    writer = PriorStoreWriter(path, metadata(compute_dtype="bf16"))  # extract_priors.py --bf16
    writer.prepare()
    writer.write_shard(IDS[:4], priors_for(IDS[:4]))
    assert json.loads((path / "store.json").read_text())["metadata"]["compute_dtype"] == "bf16"
    # A rerun without --bf16 would add fp32 priors to the bf16 ones.
    with pytest.raises(PriorStoreError, match="compute_dtype: 'bf16' vs 'fp32'"):
        PriorStoreWriter(path, metadata()).prepare()
    resumed = PriorStoreWriter(path, metadata(compute_dtype="bf16"))
    resumed.prepare()
    resumed.write_shard(IDS[4:], priors_for(IDS[4:]))
    resumed.finalize(IDS)
    assert PriorStore(path).metadata.compute_dtype == "bf16"
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        metadata(compute_dtype="fp16")


def test_store_from_before_compute_precision_was_recorded(store_path):
    # Such a store's metadata has no compute_dtype: its priors may be fp32 or bf16 computed.
    store_json = store_path / "store.json"
    store = json.loads(store_json.read_text())
    del store["metadata"]["compute_dtype"]
    store_json.write_text(json.dumps(store))
    old = PriorStore(store_path, expected_model_fingerprint="model-a")  # still readable
    assert old.metadata.compute_dtype is None
    assert torch.equal(old.read(IDS).transpose(0, 1), torch.from_numpy(priors_for(IDS)))
    # ... and its metadata digest is still the one its shard files were written with.
    assert old.metadata.to_json() == store["metadata"]
    assert old.metadata.digest() == sha256_text(canonical_json(store["metadata"]))
    # Resuming it could mix precisions without anyone knowing: refused, whichever is asked for.
    for compute_dtype in ("fp32", "bf16"):
        with pytest.raises(PriorStoreError, match="before stores recorded the compute precision"):
            PriorStoreWriter(store_path, metadata(compute_dtype=compute_dtype)).prepare()
    with pytest.raises(ValueError, match="records its compute precision"):
        PriorStoreWriter(store_path, old.metadata)


def test_writer_checks(tmp_path):
    writer = PriorStoreWriter(tmp_path / "s", metadata())
    writer.prepare()
    with pytest.raises(ValueError, match="shape"):
        writer.write_shard(["a-1"], np.zeros((1, 3, EXPERTS), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        writer.write_shard(["a-1"], np.full((1, len(LAYERS), EXPERTS), np.nan, np.float32))
    writer.write_shard(["s-1"], priors_for(["s-1"]))
    writer.write_shard(["s-2"], priors_for(["s-2"]))
    with pytest.raises(PriorStoreError, match=r"1 not in the corpus \(e.g. \['s-2'\]\)"):
        writer.finalize(["s-1"])


def test_store_pickles_for_loader_workers(store_path):
    store = PriorStore(store_path)
    store.read(IDS)
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.read(IDS, layers=[9]), store.read(IDS, layers=[9]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_read_rows_by_global_row(tmp_path, dtype):
    store = PriorStore(write_store(tmp_path / dtype, dtype=dtype, split=3))  # 4 shards
    # Global rows number the shards in store.json's order (by name, not by write order).
    order = store.sample_ids
    assert sorted(order) == sorted(IDS)
    assert store.global_rows(["s-9", "s-0", "s-4"]).tolist() == [order.index(s)
                                                                 for s in ("s-9", "s-0", "s-4")]
    with pytest.raises(MissingPriorError, match=r"1 sample id\(s\).*'nope'"):
        store.global_rows(["s-1", "nope"])
    rows = [9, 0, 4, 4, 7, 2]  # any order, repeats, across shards
    for layers in (None, [8, 9], [12, 7]):  # all, contiguous, scattered and reordered
        got = store.read_rows(rows, layers, chunk_rows=2)
        want = store.read([order[r] for r in rows], layers).transpose(0, 1)
        assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), want)
    assert store.read_rows([], [8]).shape == (0, 1, EXPERTS)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        store.read_rows([3, 10])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prior_table_gathers_the_stored_priors(tmp_path, dtype):
    store = PriorStore(write_store(tmp_path / dtype, dtype=dtype, split=3))
    wanted = ["s-8", "s-1", "s-8", "s-5", "s-2", "s-1"]  # repeats: one row per distinct id
    table = PriorTable.from_store(store, wanted, layers=[12, 8], chunk_rows=2)
    in_store_order = tuple(sid for sid in store.sample_ids if sid in wanted)
    assert table.sample_ids == in_store_order and len(in_store_order) == 4
    assert len(table) == 4 and table.layers == (12, 8) and table.num_experts == EXPERTS
    assert table.priors.shape == (2, 4, EXPERTS) and table.priors.is_contiguous()
    assert table.nbytes == PriorTable.nbytes_for(4, 2, EXPERTS) == 4 * 2 * EXPERTS * 4
    rows = table.rows(wanted)
    assert rows.dtype == np.int64 and table.sample_ids_at(rows) == wanted
    gathered = table.gather(torch.from_numpy(rows))
    assert gathered.shape == (2, len(wanted), EXPERTS) and gathered.is_contiguous()
    assert torch.equal(gathered, store.read(wanted, layers=[12, 8]))
    assert torch.equal(table["s-5"], store.read(["s-5"], layers=[12, 8])[:, 0])
    assert torch.equal(table.gather(rows.tolist()), gathered)  # plain ints too
    with pytest.raises(MissingPriorError, match="'s-0'"):
        table.rows(["s-1", "s-0"])
    with pytest.raises(RuntimeError, match="out of"):  # index_select's bounds check on CPU
        table.gather([0, 4])
    with pytest.raises(IndexError, match=r"rows \[4\] are outside"):
        table.sample_ids_at([4])


def test_prior_table_refusals_and_identity(store_path):
    store = PriorStore(store_path)
    with pytest.raises(MissingPriorError, match=r"1 sample id\(s\).*'gsm8k-404'"):
        PriorTable.from_store(store, ["s-1", "gsm8k-404"])
    with pytest.raises(PriorStoreError, match=r"layers \[10\] were not recorded"):
        PriorTable.from_store(store, ["s-1"], layers=[9, 10])
    full = PriorTable.from_store(store, IDS)
    assert full.layers == LAYERS and torch.equal(full.gather(full.rows(IDS)), store.read(IDS))
    # The digest names the ids and layers a row index refers to, and survives a move.
    assert full.to("cpu").digest == full.digest == PriorTable.from_store(store, IDS[::-1]).digest
    assert PriorTable.from_store(store, IDS, layers=[7, 8]).digest != full.digest
    assert PriorTable.from_store(store, IDS[1:]).digest != full.digest


def test_layer_selection():
    assert parse_layer_selection("7-34", 48) == tuple(range(7, 35))
    assert parse_layer_selection("0, 3,8-9", 10) == (0, 3, 8, 9)
    assert parse_layer_selection("all", 4) == (0, 1, 2, 3) == parse_layer_selection(None, 4)
    with pytest.raises(ValueError, match=r"outside the model's 0..47"):
        parse_layer_selection("40-48", 48)
    with pytest.raises(ValueError, match="bad layer selection"):
        parse_layer_selection("9-7", 48)


def test_model_fingerprint(tmp_path):
    from sara_megatron.priors import model_fingerprint

    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "common.pt").write_bytes(b"weights")
    (ckpt / "sub" / "__0_0.distcp").write_bytes(b"more weights")
    computed = model_fingerprint(ckpt)
    assert computed.startswith("sha256-files:") and model_fingerprint(ckpt) == computed
    (ckpt / "common.pt").write_bytes(b"weightz")
    assert model_fingerprint(ckpt) != computed
    # A converted checkpoint carries its HF source's fingerprint (tools/convert_hf.py).
    from sara_megatron.checkpointing.record import read_metadata, write_metadata

    write_metadata(str(ckpt), {"source": {"fingerprint": "abc123"}})
    assert model_fingerprint(ckpt) == "hf-safetensors-sha256:abc123"
    # A training checkpoint carries that record forward, marked: its weights are its own.
    record = read_metadata(str(ckpt))
    record["training"] = {"base_checkpoint": "elsewhere"}
    write_metadata(str(ckpt), record)
    assert model_fingerprint(ckpt).startswith("sha256-files:")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "nope")


def test_priors_of_the_model_a_run_started_from_fit_its_checkpoints(tmp_path, monkeypatch):
    """A run started from a fine-tuned checkpoint (e.g. at an expert-parallel layout its
    optimizer state cannot resume at) keeps the anchors of the converted model the first run
    started from, or takes priors of the fine-tuned weights themselves; nothing else."""
    from sara_megatron.checkpointing.record import write_metadata
    from sara_megatron.priors import (
        model_fingerprint,
        prior_anchor_fingerprints,
        read_prior_store_metadata,
    )

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "common.pt").write_bytes(b"weights")
    assert prior_anchor_fingerprints(ckpt) == (model_fingerprint(ckpt),)
    write_metadata(str(ckpt), {"source": {"fingerprint": "abc123"}})
    assert prior_anchor_fingerprints(ckpt) == ("hf-safetensors-sha256:abc123",)  # converted
    write_metadata(str(ckpt), {"source": {"fingerprint": "abc123"},
                               "training": {"base_checkpoint": "elsewhere"}})
    own = model_fingerprint(ckpt)
    assert own.startswith("sha256-files:")
    assert prior_anchor_fingerprints(ckpt) == (own, "hf-safetensors-sha256:abc123")
    assert prior_anchor_fingerprints(ckpt, "model-b") == (own, "hf-safetensors-sha256:abc123")
    # Priors of the converted model: the checkpoint's files (optimizer state too) are not hashed.
    import sara_megatron.priors.fingerprint as fingerprint

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(fingerprint, "checkpoint_files_fingerprint", no_hashing)
    assert prior_anchor_fingerprints(ckpt, "hf-safetensors-sha256:abc123") == (
        "hf-safetensors-sha256:abc123",)
    monkeypatch.undo()

    accepted = prior_anchor_fingerprints(ckpt)
    for model in accepted:
        path = write_store(tmp_path / model.split(":")[0], model=model)
        assert read_prior_store_metadata(path).model_fingerprint == model
        PriorStore(path, expected_model_fingerprint=accepted)
    with pytest.raises(PriorStoreError, match=r"expected sha256-files:\w+ or "
                                              r"hf-safetensors-sha256:abc123"):
        PriorStore(write_store(tmp_path / "other", model="model-b"),
                   expected_model_fingerprint=accepted)
