"""tools/convert_hf.py: HF ⇄ Megatron-Core round trips at every layout, logits parity, bad input.

Tiny random Qwen3-MoE (one safetensors file, vocab 300 padded to 384, head dim 32 ≠ hidden/heads;
also with tied embeddings) and PhiMoE (sharded safetensors with an index, q/k/v/o and lm_head
biases, LayerNorm, longrope, vocab 250 padded to 256), built from transformers configs and saved
with `save_pretrained`, each with a small real tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import launch
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from sara_megatron.conversion.errors import ConversionError  # noqa: E402
from sara_megatron.conversion.hf_export import export_hf_checkpoint  # noqa: E402
from sara_megatron.conversion.hf_import import import_hf_checkpoint  # noqa: E402
from sara_megatron.checkpointing.record import METADATA_FILE  # noqa: E402
from sara_megatron.conversion.safetensors_io import INDEX_FILE  # noqa: E402
from sara_megatron.conversion.verify import Thresholds, passes, verify_conversion  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen3_moe", "phimoe", "qwen3_moe_tied"]
LAYOUTS = ["tp2", "ep2", "pp2"]


# --- tiny HF models -----------------------------------------------------------------------------


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _randomize(model) -> None:
    """Every weight O(1)-relevant for the logits: norms around 1, biases and embeddings random."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif "embed_tokens" in name or ".gate." in name or "router" in name:
                p.copy_(noise)
            else:
                p.copy_(0.08 * noise)


def _qwen3_moe(path: Path, tie_word_embeddings: bool = False) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=tie_word_embeddings,
    )
    model = Qwen3MoeForCausalLM(cfg)
    _randomize(model)
    model.save_pretrained(path)
    _tokenizer(cfg.vocab_size).save_pretrained(path)


def _phimoe(path: Path) -> None:
    from transformers import PhimoeConfig, PhimoeForCausalLM

    g = torch.Generator().manual_seed(1)
    short = (1.0 + torch.rand(8, generator=g)).tolist()
    long = (1.0 + 20 * torch.rand(8, generator=g)).sort().values.tolist()
    cfg = PhimoeConfig(
        vocab_size=250, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, attention_bias=True, lm_head_bias=True,
        router_jitter_noise=0.01, input_jitter_noise=0.01, rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, short_factor=short, long_factor=long,
            short_mscale=1.2432, long_mscale=1.2432, original_max_position_embeddings=64,
        ),
    )
    model = PhimoeForCausalLM(cfg)
    _randomize(model)
    model.save_pretrained(path, max_shard_size="60KB")  # several files + index
    _tokenizer(cfg.vocab_size).save_pretrained(path)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    makers = {"qwen3_moe": _qwen3_moe, "phimoe": _phimoe,
              "qwen3_moe_tied": lambda path: _qwen3_moe(path, tie_word_embeddings=True)}
    for family in FAMILIES:
        paths[family] = root / family
        makers[family](paths[family])
    assert (paths["phimoe"] / INDEX_FILE).exists()
    assert len(list(paths["phimoe"].glob("*.safetensors"))) > 2
    return paths


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory):
    """Single-process (TP=EP=PP=1) imports, shared by the tests below."""
    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for family in FAMILIES:
        out[family] = root / family
        import_hf_checkpoint(hf_models[family], out[family])
    return out


# --- helpers ------------------------------------------------------------------------------------


def _hub_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, read with the safetensors library (independent of ours)."""
    index = folder / INDEX_FILE
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        part = load_file(folder / f)
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors


def assert_bitwise_equal(expected_dir: Path, got_dir: Path, dtype=None) -> None:
    expected, got = _hub_tensors(expected_dir), _hub_tensors(got_dir)
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, t in expected.items():
        t = t.to(dtype) if dtype is not None else t
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- round trips and parity ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_single_process_round_trip_metadata_and_verify(hf_models, imported, tmp_path, family):
    """import → export at TP=EP=PP=1 gives the source's tensors bit for bit (same keys, dtype),
    its config and tokenizer; the metadata fingerprints the source; transformers loads the export
    as-is and `verify` passes against both the source and the export."""
    src, mcore = hf_models[family], imported[family]
    out = tmp_path / "hf_out"
    export_hf_checkpoint(mcore, out)
    assert_bitwise_equal(src, out)

    record = json.loads((mcore / METADATA_FILE).read_text())
    files = sorted(p.name for p in src.glob("*.safetensors"))
    assert record["source"]["files"] == {f: _sha256(src / f) for f in files}
    assert len(record["source"]["fingerprint"]) == 64
    assert record["family"] == family.removesuffix("_tied") and record["dtype"] == "fp32"
    assert record["padded_vocab_size"] == {"phimoe": 256}.get(family, 384)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("t3 t7").input_ids == [3, 7]

    for hf_dir in (src, out):
        result = verify_conversion(hf_dir, mcore, seq_len=32, batch=2)
        assert result["max_abs_diff"] <= 1e-4, result
        assert result["argmax_agreement"] == 1.0, result
        assert passes(result, Thresholds())


def test_bf16_import_and_sharded_export(hf_models, tmp_path):
    """--dtype bf16 stores bf16 (export = the fp32 source rounded to bf16, config dtype
    bfloat16); a small --max-shard-size writes several files and an index transformers loads."""
    mcore, out = tmp_path / "mcore", tmp_path / "hf_out"
    import_hf_checkpoint(hf_models["qwen3_moe"], mcore, dtype="bf16")
    summary = export_hf_checkpoint(mcore, out, max_shard_size="40KB")
    assert len(summary["files"]) > 2 and (out / INDEX_FILE).exists()
    assert_bitwise_equal(hf_models["qwen3_moe"], out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _hub_tensors(out).values()
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


@pytest.mark.stack
def test_layouts_round_trip_and_load_across_layouts(torchrun, hf_models, imported, tmp_path):
    """Under torchrun (2 ranks) import at TP=2, EP=2 and PP=2: each exports to the source bit for
    bit; each checkpoint loaded at a different layout gives the TP=EP=PP=1 import's logits (bit
    for bit, up to fp32 roundoff where TP splits reductions)."""
    result_file = tmp_path / "result.json"
    models = [f"--model={f}={hf_models[f]}={imported[f]}" for f in FAMILIES]
    torchrun("tests/workers/convert_layouts.py", *models, "--out-root", str(tmp_path),
             "--result", str(result_file), timeout=600)
    for family in FAMILIES:
        for layout in LAYOUTS:
            out = tmp_path / f"{family}_{layout}_hf"
            export_hf_checkpoint(tmp_path / f"{family}_{layout}", out)
            assert_bitwise_equal(hf_models[family], out)
            record = json.loads((tmp_path / f"{family}_{layout}" / METADATA_FILE).read_text())
            assert record["layout"]["world_size"] == 2
    result = json.loads(result_file.read_text())
    for family in FAMILIES:
        diffs = result[family]
        ref = diffs.pop("reference_max_abs")
        assert ref > 1.0  # the comparison is not vacuous
        assert set(diffs) == {"tp2->ep2", "ep2->pp2", "pp2->tp2", "tp2->base"}
        for pair, diff in diffs.items():
            # Same weights, same arithmetic unless TP splits a reduction: exact, else roundoff.
            tolerance = 1e-6 * ref if pair.endswith("tp2") else 0.0
            assert diff <= tolerance, (family, pair, diff, ref)


def _cli(*args: str, **launcher_env: str) -> subprocess.CompletedProcess:
    # A fresh process: drop the rendezvous variables this test process set for its own group.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(
        launch.tool("convert_hf", *args), capture_output=True,
        text=True, timeout=300, env=dict(env, PYTHONWARNINGS="ignore", **launcher_env),
    )


def _model_weights(hf_dir: Path, megatron_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of our model (TP=EP=PP=1, this process) loaded from a Megatron checkpoint."""
    from sara_megatron.checkpointing import load_model_weights
    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.models.architecture import from_hf_config
    from sara_megatron.models.builder import build_model

    initialize_distributed(ParallelConfig())
    model = build_model(from_hf_config(hf_dir))
    load_model_weights(model, megatron_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


@pytest.mark.multiprocess
def test_export_of_an_ep2_training_checkpoint(torchrun, hf_models, imported, tmp_path):
    """A real training checkpoint: one step from the import on 2 gloo ranks with EP=2, so megatron
    chains two optimizers (dense and expert parameters) and saves their state beside the weights
    under `chained_<N>.optimizer.`. The command line exports it as it is (training carried the
    import's conversion metadata and HF assets), and the export holds the trained weights:
    imported back they are the checkpoint's bit for bit, and transformers' model on it gives our
    logits on the checkpoint. Without the metadata (a run from a preset's random weights) it
    needs --hf-dir, and then writes the same tensors."""
    from megatron.core import dist_checkpointing

    src = hf_models["qwen3_moe"]
    settings = {
        "model.preset": src, "model.checkpoint": imported["qwen3_moe"], "parallel.ep": 2,
        "data.mock": "true", "data.seq_length": 16, "data.micro_batch_size": 1,
        "data.global_batch_size": 2, "sara.layers": "all", "optim.lr": 1e-2,
        "optim.train_steps": 1, "checkpoint.save_dir": tmp_path / "run",
    }
    torchrun("train", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")])
    ckpt = tmp_path / "run" / "iter_0000001"
    assert (ckpt / METADATA_FILE).exists()

    out = tmp_path / "hf"
    proc = _cli("export", "--megatron-dir", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )

    trained = _model_weights(src, ckpt)
    keys = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for part in (0, 1):  # the key shape this test is about
        assert any(k.startswith(f"chained_{part}.optimizer.state.exp_avg.") for k in keys), part
    import_hf_checkpoint(out, tmp_path / "reimported")
    exported = _model_weights(src, tmp_path / "reimported")
    base = _model_weights(src, imported["qwen3_moe"])
    assert set(exported) == set(trained)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    for name, t in trained.items():
        got = exported[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t, got = t[:vocab], got[:vocab]  # padded rows: ours alone, dropped by export
        assert torch.equal(got, t), name
    # Training moved dense and expert weights alike: the comparison is with the trained ones.
    moved = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert any(".experts." in k for k in moved) and any("self_attention" in k for k in moved)

    result = verify_conversion(out, ckpt, seq_len=16, batch=2)
    assert passes(result, Thresholds()), result

    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns(METADATA_FILE, "hf_assets"))
    with pytest.raises(ConversionError, match="pass --hf-dir"):
        export_hf_checkpoint(bare, tmp_path / "hf_bare")
    export_hf_checkpoint(bare, tmp_path / "hf_bare", hf_dir=src)
    assert_bitwise_equal(out, tmp_path / "hf_bare")


def test_only_optimizer_state_is_skipped():
    """Megatron's optimizer namespace, plain or chained, is not a weight; anything else the
    config does not imply is reported."""
    from sara_megatron.conversion.hf_export import is_optimizer_state

    for key in ("optimizer.state.exp_avg.decoder.final_layernorm.weight",
                "chained_0.optimizer.state.exp_avg_sq.embedding.word_embeddings.weight",
                "chained_1.optimizer.state.param.decoder.layers.mlp.experts.experts.linear_fc2"
                ".weight",
                "chained_12.optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_x.bucket_idx_0"):
        assert is_optimizer_state(key), key
    for key in ("decoder.layers.mlp.router.weight", "chained_0.decoder.final_layernorm.weight",
                "chained_x.optimizer.state.exp_avg.output_layer.weight",
                "decoder.optimizer.state.exp_avg", "optimizer_state.exp_avg"):
        assert not is_optimizer_state(key), key


@pytest.mark.multiprocess
def test_command_line_verify_prints_one_json_line(hf_models, imported):
    proc = _cli("verify", "--hf-dir", str(hf_models["qwen3_moe"]),
                "--megatron-dir", str(imported["qwen3_moe"]), "--seq-len", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"max_abs_diff", "mean_abs_diff", "cosine", "argmax_agreement"}
    assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0


def test_verify_thresholds():
    good = {"max_abs_diff": 5e-5, "mean_abs_diff": 1e-6, "cosine": 0.99, "argmax_agreement": 1.0}
    assert passes(good, Thresholds())
    assert not passes(dict(good, max_abs_diff=2e-4), Thresholds())
    assert not passes(dict(good, argmax_agreement=0.99), Thresholds())
    assert passes(dict(good, argmax_agreement=0.99), Thresholds(min_argmax_agreement=0.95))
    assert not passes(good, Thresholds(min_cosine=0.999))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_unsupported_architecture_names_the_supported(hf_models, tmp_path):
    src = _copy_hf(hf_models["qwen3_moe"], tmp_path / "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM.*PhiMoEForCausalLM"):
        import_hf_checkpoint(src, tmp_path / "out")
    proc = _cli("import", "--hf-dir", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unsupported HF architecture" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _rewrite_single_file(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_named(hf_models, tmp_path):
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    src = _copy_hf(hf_models["qwen3_moe"], tmp_path / "missing")
    _rewrite_single_file(src, lambda t: t.pop(gone))
    with pytest.raises(ConversionError, match=rf"missing tensors: {gone}"):
        import_hf_checkpoint(src, tmp_path / "out")

    src = _copy_hf(hf_models["qwen3_moe"], tmp_path / "unexpected")
    _rewrite_single_file(src, lambda t: t.update({"model.layers.0.mlp.shared_expert.weight":
                                                  torch.zeros(2)}))
    with pytest.raises(ConversionError,
                       match="unexpected tensors: model.layers.0.mlp.shared_expert"):
        import_hf_checkpoint(src, tmp_path / "out")

    name = "model.layers.0.self_attn.k_proj.weight"
    src = _copy_hf(hf_models["qwen3_moe"], tmp_path / "shape")
    _rewrite_single_file(src, lambda t: t.update({name: torch.zeros(32, 64)}))
    with pytest.raises(ConversionError,
                       match=rf"shape mismatch for {name}: checkpoint has \(32, 64\), the config "
                             rf"implies \(64, 64\)"):
        import_hf_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ambiguous_or_unindexed_safetensors_are_refused(hf_models, tmp_path):
    src = _copy_hf(hf_models["phimoe"], tmp_path / "both")
    shutil.copy(hf_models["qwen3_moe"] / "model.safetensors", src / "model.safetensors")
    with pytest.raises(ConversionError, match="both model.safetensors and"):
        import_hf_checkpoint(src, tmp_path / "out")
    (src / "model.safetensors").unlink()
    (src / INDEX_FILE).unlink()
    with pytest.raises(ConversionError, match="no model.safetensors.index.json"):
        import_hf_checkpoint(src, tmp_path / "out")


def test_existing_output_refused_unless_overwrite(hf_models, imported, tmp_path):
    out = tmp_path / "mcore"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        import_hf_checkpoint(hf_models["qwen3_moe"], out)
    assert (out / "keep.txt").exists()
    hf_out = tmp_path / "hf"
    hf_out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        export_hf_checkpoint(imported["qwen3_moe"], hf_out)
    export_hf_checkpoint(imported["qwen3_moe"], hf_out, overwrite=True)
    assert_bitwise_equal(hf_models["qwen3_moe"], hf_out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mcore"]  # no leftovers


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
                       "SLURM_STEP_NUM_TASKS")


@pytest.mark.parametrize("launcher", [
    {"RANK": "1", "WORLD_SIZE": "2"},  # torchrun --nproc-per-node 2
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"},
])
def test_export_refuses_several_launched_processes(tmp_path, monkeypatch, launcher):
    """Each rank would export alone to the same folder; with --overwrite one rank's output would
    delete another's. Refused before anything is read or written: the old output stays."""
    for name in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(ConversionError, match="export runs in one process, but this is one of "
                                              r"\d started by torchrun or srun"):
        export_hf_checkpoint(tmp_path / "mcore", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "keep.txt").read_text() == "previous export"


def test_export_runs_from_a_batch_script(monkeypatch):
    """sbatch's batch step (SLURM_PROCID=0, SLURM_NTASKS=4, no srun step) is one process: export
    goes ahead. The same variables inside an srun step (its step variables set) are refused."""
    from sara_megatron.conversion.hf_export import refuse_multi_process_launch
    from sara_megatron.distributed import launcher_world_size

    for name in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launcher_world_size() == 1
    assert refuse_multi_process_launch() is None  # returns, does not raise

    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert launcher_world_size() == 4
    with pytest.raises(ConversionError, match="one of 4 started by torchrun or srun"):
        refuse_multi_process_launch()


@pytest.mark.multiprocess
def test_command_line_export_under_torchrun_exits_2(tmp_path):
    out = tmp_path / "hf"
    proc = _cli("export", "--megatron-dir", str(tmp_path / "mcore"), "--out", str(out),
                "--overwrite", RANK="0", WORLD_SIZE="2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "export: error: export runs in one process" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_layout_without_enough_processes_says_how_to_start(hf_models, tmp_path):
    with pytest.raises(ConversionError, match="torchrun --nproc-per-node 4"):
        import_hf_checkpoint(hf_models["qwen3_moe"], tmp_path / "out", tp=2, ep=2)
    with pytest.raises(ValueError, match="EP=3 must divide num_experts=4"):
        import_hf_checkpoint(hf_models["qwen3_moe"], tmp_path / "out", ep=3)
    assert not (tmp_path / "out").exists()


def test_crash_mid_conversion_leaves_no_output(hf_models, imported, tmp_path, monkeypatch):
    from sara_megatron.conversion import hf_export
    from sara_megatron.conversion.safetensors_io import SafetensorsCheckpoint

    calls = {"n": 0}
    real_read = SafetensorsCheckpoint.read

    def failing_read(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", failing_read)
    with pytest.raises(RuntimeError, match="disk on fire"):
        import_hf_checkpoint(hf_models["qwen3_moe"], tmp_path / "mcore")
    monkeypatch.undo()

    real_load = hf_export._load_batch
    batches = {"n": 0}

    def failing_load(*args):
        batches["n"] += 1
        if batches["n"] == 2:
            raise RuntimeError("killed")
        return real_load(*args)

    monkeypatch.setattr(hf_export, "_load_batch", failing_load)
    with pytest.raises(RuntimeError, match="killed"):
        export_hf_checkpoint(imported["qwen3_moe"], tmp_path / "hf", read_batch_bytes=20_000)
    assert list(tmp_path.iterdir()) == []


def test_export_names_checkpoint_config_mismatches(imported, tmp_path):
    """A checkpoint whose recorded config disagrees with its tensors: shapes and extra tensors
    are named, nothing is written."""
    mcore = tmp_path / "mcore"
    shutil.copytree(imported["phimoe"], mcore)
    record = json.loads((mcore / METADATA_FILE).read_text())

    record["hf_config"]["intermediate_size"] = 48
    (mcore / METADATA_FILE).write_text(json.dumps(record))
    with pytest.raises(ConversionError,
                       match=r"shape mismatch for decoder.layers.mlp.experts.experts.linear_fc1"
                             r".weight: checkpoint has \(2, 4, 64, 64\), the config implies "
                             r"\(2, 4, 96, 64\)"):
        export_hf_checkpoint(mcore, tmp_path / "hf")

    record["hf_config"]["intermediate_size"] = 32
    record["hf_config"]["attention_bias"] = False
    (mcore / METADATA_FILE).write_text(json.dumps(record))
    with pytest.raises(ConversionError, match=r"unexpected tensors: .*linear_proj.bias.*"
                                              r"linear_qkv.bias"):
        export_hf_checkpoint(mcore, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    from sara_megatron.model_folders import NotACheckpointError

    with pytest.raises(NotACheckpointError, match="is not a Megatron-Core checkpoint"):
        export_hf_checkpoint(tmp_path, tmp_path / "hf", hf_dir=mcore / "hf_assets")


def test_a_model_of_another_configuration_is_refused(hf_models, imported, tmp_path):
    """Same tensor shapes are not the same model: a checkpoint's recorded architecture is checked
    before its weights load (a changed norm epsilon loaded silently, and another model's smaller
    vocabulary loaded the first rows of the embedding)."""
    from sara_megatron.checkpointing import load_model_weights
    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.models.architecture import from_hf_config, get_preset
    from sara_megatron.models.builder import build_model

    initialize_distributed(ParallelConfig())
    config = json.loads((hf_models["qwen3_moe"] / "config.json").read_text())
    other = dict(config, rms_norm_eps=1e-2)
    with pytest.raises(ValueError, match=r"another model configuration \(norm_epsilon: "
                                         r"checkpoint 1e-06, model 0\.01\)"):
        load_model_weights(build_model(from_hf_config(other)), imported["qwen3_moe"])
    with pytest.raises(ValueError, match="vocab_size: checkpoint"):
        load_model_weights(build_model(get_preset("qwen3_moe_tiny")), imported["phimoe"])
    fewer = from_hf_config(dict(config, num_hidden_layers=config["num_hidden_layers"] - 1))
    with pytest.raises(ValueError, match="num_layers: checkpoint"):
        load_model_weights(build_model(fewer), imported["qwen3_moe"])
    load_model_weights(build_model(from_hf_config(config)), imported["qwen3_moe"])
    # A checkpoint without a record (trained from a preset's random weights) is not checked.
    bare = tmp_path / "bare"
    shutil.copytree(imported["qwen3_moe"], bare, ignore=shutil.ignore_patterns(METADATA_FILE))
    load_model_weights(build_model(from_hf_config(config)), bare)
