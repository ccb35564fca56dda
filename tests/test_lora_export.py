"""Export of a LoRA run's checkpoint (tools/convert_hf.py export --merge-adapters / --peft-adapter,
sara_megatron/conversion/lora_export.py).

A tiny random Qwen3-MoE is imported (fp32), then trained one step with LoRA (real trainer, 2 gloo
ranks, EP=2: expert adapters live on their EP rank) at a high learning rate so that B, zero at
the start, moves. The reference is our Megatron model with the adapters on (the base loaded, the
checkpoint's adapters and router loaded into `apply_lora`'s parameters), in fp32:

- the merged HF folder, imported back, gives that model's logits (≤ 1e-5), and transformers'
  model of the merged folder agrees with it as a conversion does (`verify`'s threshold);
- the PEFT adapter (attention adapters, expert adapters on transformers' fused expert parameters,
  router saved whole) loaded by transformers + peft on the base HF folder gives transformers'
  logits of the merged folder (≤ 1e-5) and so ours;
- another base (other fingerprint) is refused; a LoRA checkpoint exported without either flag is
  refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sara_megatron.conversion.errors import ConversionError  # noqa: E402
from sara_megatron.conversion.hf_export import export_hf_checkpoint  # noqa: E402
from sara_megatron.conversion.hf_import import import_hf_checkpoint  # noqa: E402
from sara_megatron.conversion.lora_export import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    export_merged,
    export_peft_adapter,
    lora_record,
)
from sara_megatron.conversion.verify import logits_comparison  # noqa: E402
from test_convert_hf import _qwen3_moe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # two training runs (torchrun)
ATTENTION = "attention_qkv,attention_proj"
ALL = "attention_qkv,attention_proj,experts_fc1,experts_fc2"
SEQ, BATCH = 16, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_base")
    _qwen3_moe(root / "hf")
    import_hf_checkpoint(root / "hf", root / "mcore")
    return root


def _train(torchrun, base: Path, out: Path, targets: str, expert_adapters: str, router: str,
           ep: int) -> Path:
    settings = {
        "model.preset": base / "hf", "model.checkpoint": base / "mcore", "parallel.ep": ep,
        "data.mock": "true", "data.seq_length": 16, "data.micro_batch_size": 1,
        "data.global_batch_size": 2, "sara.layers": "all", "optim.lr": 5e-2,
        "optim.train_steps": 1, "checkpoint.save_dir": out, "peft.method": "lora",
        "peft.rank": 4, "peft.alpha": 8, "peft.targets": targets,
        "peft.expert_adapters": expert_adapters, "peft.router": router,
    }
    torchrun("tools/train.py", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
             nproc=max(ep, 1))
    return out / "iter_0000001"


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Two LoRA runs: every target with per-expert adapters at EP=2 (router trained fully), and
    attention alone on one rank with a router LoRA."""
    import launch

    root = tmp_path_factory.mktemp("lora_runs")

    def torchrun(script, *args, nproc):
        proc = launch.run(launch.torchrun_command(script, *args, nproc=nproc), root, 900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    return {
        "experts": _train(torchrun, base, root / "experts", ALL, "per_expert", "full", ep=2),
        "attention": _train(torchrun, base, root / "attention", ATTENTION, "per_expert", "lora",
                            ep=1),
    }


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _megatron_logits(hf_dir: Path, weights: Path, lora_dir: Path | None = None) -> torch.Tensor:
    """Our model (fp32, one process) on `weights`, with the adapters of `lora_dir` on."""
    from megatron.core import dist_checkpointing

    from sara_megatron.checkpointing import load_model_weights
    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.models.architecture import from_hf_config
    from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
    from sara_megatron.peft import LoraSettings, apply_lora

    initialize_distributed(ParallelConfig())
    arch = from_hf_config(hf_dir)
    model = build_model(arch, ModelOptions(params_dtype=torch.float32,
                                           perform_initialization=False)).eval()
    load_model_weights(model, weights)
    if lora_dir is not None:
        record = lora_record(str(lora_dir))
        apply_lora([model], LoraSettings(
            rank=record["rank"], alpha=record["alpha"], targets=tuple(record["targets"]),
            expert_adapters=record["expert_adapters"], router=record["router"]))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        sharded = {k: v for k, v in model.sharded_state_dict(prefix="").items() if k in trained}
        assert sharded and len(sharded) == len(trained)
        loaded = dist_checkpointing.load(sharded, str(lora_dir))
        missing, _ = model.load_state_dict(loaded, strict=False)
        assert not set(missing) & trained
    tokens = _tokens(arch.vocab_size)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return model(tokens, positions, causal_attention_mask(SEQ))[..., : arch.vocab_size].float()


@torch.no_grad()
def _hf_logits(hf_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    return model(input_ids=_tokens(vocab)).logits.float()


def _assert_close(expected, got, atol):
    result = logits_comparison(expected, got)
    assert result["max_abs_diff"] <= atol and result["argmax_agreement"] == 1.0, result


@pytest.mark.parametrize("run", ["experts", "attention"])
def test_merged_export_equals_the_adapted_model(base, runs, tmp_path, run):
    lora_dir = runs[run]
    record = lora_record(str(lora_dir))
    assert record["base_checkpoint"] == str(base / "mcore")
    adapted = _megatron_logits(base / "hf", base / "mcore", lora_dir)
    plain = _megatron_logits(base / "hf", base / "mcore")
    assert (adapted - plain).abs().max() > 1e-3  # the trained adapters change the model

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_hf.py"), "export",
                           "--megatron-dir", str(lora_dir), "--out", str(out),
                           "--merge-adapters"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).exists()
    import_hf_checkpoint(out, tmp_path / "reimported")
    _assert_close(adapted, _megatron_logits(out, tmp_path / "reimported"), atol=1e-5)
    _assert_close(adapted, _hf_logits(out), atol=1e-4)  # verify's threshold


def test_peft_adapter_of_the_experts_loads_and_matches(base, runs, tmp_path):
    """Per-expert adapters at EP=2 in PEFT's layout for transformers' fused expert parameters
    (target_parameters): transformers + peft give the merged folder's logits."""
    pytest.importorskip("peft")
    lora_dir = runs["experts"]
    summary = export_peft_adapter(lora_dir, tmp_path / "adapter")
    assert summary["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    export_merged(lora_dir, tmp_path / "merged")
    _assert_close(_hf_logits(tmp_path / "merged"), _hf_logits(base / "hf", tmp_path / "adapter"),
                  atol=1e-5)


def test_peft_adapter_loads_into_transformers_and_matches(base, runs, tmp_path):
    pytest.importorskip("peft")
    lora_dir = runs["attention"]
    adapter = tmp_path / "adapter"
    summary = export_peft_adapter(lora_dir, adapter)
    assert summary["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert summary["modules_to_save"] == ["gate"]
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    from safetensors import safe_open

    with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as f:
        names = set(f.keys())
        q_b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        q_a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        k_a = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight")
    assert "base_model.model.model.layers.1.mlp.gate.weight" in names
    assert q_b.shape == (4 * 32, 4) and q_a.shape == (4, 64) and torch.equal(q_a, k_a)

    merged = tmp_path / "merged"
    export_merged(lora_dir, merged)
    with_adapter = _hf_logits(base / "hf", adapter)
    _assert_close(_hf_logits(merged), with_adapter, atol=1e-5)
    _assert_close(_megatron_logits(base / "hf", base / "mcore", lora_dir), with_adapter,
                  atol=1e-4)


def test_refusals(base, runs, tmp_path):
    # A LoRA checkpoint holds no base: exporting it as a model is refused, naming the flags.
    with pytest.raises(ConversionError, match="--merge-adapters.*--peft-adapter"):
        export_hf_checkpoint(runs["attention"], tmp_path / "a2")
    # Another base (a copy of the base with one weight changed: another fingerprint).
    other = tmp_path / "other_hf"
    shutil.copytree(base / "hf", other)
    from safetensors.torch import load_file, save_file

    [file] = other.glob("*.safetensors")
    tensors = load_file(file)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, file, metadata={"format": "pt"})
    import_hf_checkpoint(other, tmp_path / "other_mcore")
    from sara_megatron.peft.runs import AdapterBaseMismatchError

    with pytest.raises(AdapterBaseMismatchError, match="trained on base"):
        export_merged(runs["attention"], tmp_path / "a3", base_dir=tmp_path / "other_mcore")
    assert not (tmp_path / "a3").exists()
    # A full fine-tuning checkpoint has no adapters to merge.
    with pytest.raises(ConversionError, match="holds no LoRA adapters"):
        export_merged(base / "mcore", tmp_path / "a4")
