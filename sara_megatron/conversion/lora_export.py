"""A LoRA run's checkpoint → a merged HF folder, or an adapter folder in PEFT's layout.

A LoRA checkpoint holds only what trained (the adapters, the router when `router: full`, their
optimizer state); its trainer record names the base checkpoint and that base's fingerprint, and
a base with another fingerprint is refused (`check_adapter_base`). Adapter tensors sit beside the
key of the weight they adapt: `<weight key without "weight">lora_a` / `lora_b` at the weight's
index (shared expert adapters: `decoder.layers.mlp.experts.linear_fc1_lora_a` at `(layer,)`);
A: [r, in], B: [out, r], the update (alpha / r)·B·A.

- Merged (`export_merged`): W + (alpha/r)·B·A in fp32, cast back, then the usual export.
- PEFT (`export_peft_adapter`): `adapter_config.json` and `adapter_model.safetensors` with PEFT's
  names for transformers' modules; the fused QKV adapter becomes exact q/k/v ones.

The layouts in full: docs/peft.md.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from sara_megatron.conversion import metadata as meta
from sara_megatron.conversion import progress
from sara_megatron.conversion.errors import ConversionError
from sara_megatron.conversion.mapping import (
    EXPERT_FC1,
    EXPERT_FC2,
    HUB_NAMES,
    PROJ,
    QKV,
    ROUTER,
    ModelMapping,
    TensorMapping,
)

# Training target → the checkpoint key of the weight it adapts.
TARGET_KEYS = {
    "attention_qkv": QKV + "weight",
    "attention_proj": PROJ + "weight",
    "experts_fc1": EXPERT_FC1,
    "experts_fc2": EXPERT_FC2,
}
EXPERT_KEYS = (EXPERT_FC1, EXPERT_FC2)
PEFT_PREFIX = "base_model.model."
# transformers' fused expert parameters ([experts, out, in]) that a Megatron expert linear is, by
# family; the export writes the expert adapters of these families only.
EXPERT_MODULE = "mlp.experts"
EXPERT_PARAMETERS = {"qwen3_moe": {EXPERT_FC1: "gate_up_proj", EXPERT_FC2: "down_proj"}}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_record(lora_dir: str) -> dict:
    """The "peft" entry of a checkpoint's trainer record (`peft.runs.peft_record`).

    Args:
        lora_dir: The LoRA run's Megatron checkpoint folder.

    Raises:
        ConversionError: the checkpoint holds no LoRA record (a full fine-tuning checkpoint,
            or an imported one).
    """
    from sara_megatron.conversion.hf_export import trainer_record

    peft = trainer_record(lora_dir).get("peft")
    if not peft or peft.get("method") != "lora":
        raise ConversionError(f"{lora_dir} holds no LoRA adapters (no peft record in its trainer "
                              "state): export it without --merge-adapters / --peft-adapter")
    return peft


def resolve_base(lora_dir: str, record: dict, base_dir: str | None) -> str:
    """The base checkpoint of a LoRA checkpoint: `base_dir`, or the one its record names.

    The base's fingerprint must be the recorded one.

    Args:
        lora_dir: The LoRA run's Megatron checkpoint folder (named in errors).
        record: Its "peft" record (`lora_record`).
        base_dir: The base checkpoint to use instead of the recorded one, or None.

    Returns:
        The absolute path of the base checkpoint.

    Raises:
        ConversionError: no base to use (adapters trained on a randomly initialised base and
            no `base_dir`), or the base's folder is missing.
        AdapterBaseMismatchError: the base is another model than the adapters were trained on.
    """
    from sara_megatron.model_folders import check_megatron_checkpoint
    from sara_megatron.peft.runs import base_fingerprint, check_adapter_base

    base = base_dir or record.get("base_checkpoint")
    if base is None:
        raise ConversionError(
            f"{lora_dir}: its adapters were trained on a randomly initialised base "
            f"({record.get('base_fingerprint')}), which no checkpoint holds: nothing to merge "
            "them into")
    base = os.path.abspath(os.fspath(base))
    if not os.path.isdir(base):
        raise ConversionError(f"the base checkpoint {base} of {lora_dir} does not exist; pass "
                              "--base-dir with the checkpoint the adapters were trained on")
    check_megatron_checkpoint(base, "--base-dir")
    # A folder base: preset and seed only name random bases, unused here.
    check_adapter_base(record, base_fingerprint(base, "", 0), lora_dir)
    return base


@dataclasses.dataclass
class LoraCheckpoint:
    """The adapters of a LoRA checkpoint, read on demand.

    Attributes:
        path: the checkpoint folder.
        record: its "peft" record (rank, alpha, targets, expert_adapters, router, base).
        tensors: checkpoint key → megatron's tensor metadata (global shape, dtype).
    """

    path: str
    record: dict
    tensors: dict

    @property
    def scale(self) -> float:
        """The LoRA scale alpha / rank."""
        return float(self.record["alpha"]) / int(self.record["rank"])

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return int(self.record["rank"])

    def factor_mappings(self, m: TensorMapping) -> tuple[TensorMapping, TensorMapping] | None:
        """The (A, B) factors of the base tensor `m`, as regions of checkpoint tensors.

        Args:
            m: The mapping of a base tensor of shape [out, in].

        Returns:
            `(A, B)` with shapes [r, in] and [out, r] (a layer's shared pair for shared expert
            adapters), or None when `m` is not adapted.
        """
        targets = {TARGET_KEYS[t] for t in self.record["targets"] if t in TARGET_KEYS}
        if self.record.get("router") == "lora":
            targets.add(ROUTER)
        if m.key not in targets:
            return None
        prefix, index = m.key[: -len("weight")], m.index
        if m.key in EXPERT_KEYS and self.record.get("expert_adapters") == "shared":
            linear = m.key[: -len(".weight")].rsplit(".", 1)[1]
            prefix, index = f"decoder.layers.mlp.experts.{linear}_", m.index[:1]
        out, inp = m.shape
        return (TensorMapping(prefix + "lora_a", index, (self.rank, inp), ()),
                TensorMapping(prefix + "lora_b", index, (out, self.rank), ()))

    def trained_router(self, m: TensorMapping) -> TensorMapping | None:
        """The router tensor to take from this checkpoint (`router: full`), else None.

        Args:
            m: The mapping of a base tensor.
        """
        if m.key == ROUTER and self.record.get("router") == "full":
            return m
        return None

    def expected_keys(self, mapping: ModelMapping) -> dict[str, tuple[int, ...]]:
        """Checkpoint key → global shape of every adapter (and trained router) tensor.

        Args:
            mapping: The model's mapping.

        Returns:
            A dict from checkpoint key to global shape (stacked layer / expert axes first).
        """
        shapes: dict[str, tuple[int, ...]] = {}
        for m in mapping.mappings:
            wanted = list(self.factor_mappings(m) or ())
            router = self.trained_router(m)
            if router is not None:
                wanted.append(router)
            for f in wanted:
                stack = tuple(i + 1 for i in f.index)
                prev = shapes.get(f.key, (0,) * len(stack) + f.shape)
                shapes[f.key] = tuple(max(a, b) for a, b in zip(prev[: len(stack)], stack)) \
                    + f.shape
        return shapes


def open_lora_checkpoint(lora_dir: str, mapping: ModelMapping) -> LoraCheckpoint:
    """Read and check a LoRA checkpoint's record and tensors against the model's mapping.

    Args:
        lora_dir: The LoRA run's Megatron checkpoint folder.
        mapping: The base model's mapping.

    Returns:
        The checked `LoraCheckpoint`.

    Raises:
        ConversionError: no LoRA record; a target without a conversion (shared_experts); an
            adapter tensor missing, of another shape, or a tensor that is neither an adapter,
            the trained router nor optimizer state.
    """
    from sara_megatron.conversion.hf_export import checkpoint_tensor_metadata, is_optimizer_state

    record = lora_record(lora_dir)
    unknown = sorted(set(record["targets"]) - set(TARGET_KEYS))
    if unknown:
        raise ConversionError(f"{lora_dir}: LoRA target(s) {', '.join(unknown)} have no export "
                              f"(known: {', '.join(TARGET_KEYS)})")
    lora = LoraCheckpoint(lora_dir, record, checkpoint_tensor_metadata(lora_dir))
    expected = lora.expected_keys(mapping)
    have = {k: tuple(v.global_shape) for k, v in lora.tensors.items() if not is_optimizer_state(k)}
    problems = []
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    problems += [f"shape mismatch for {k}: checkpoint has {have[k]}, the record implies "
                 f"{expected[k]}" for k in sorted(set(expected) & set(have))
                 if have[k] != expected[k]]
    if problems:
        raise ConversionError(f"LoRA checkpoint {lora_dir} does not match its record "
                              f"(rank {lora.rank}, targets {', '.join(record['targets'])}, "
                              f"{record.get('expert_adapters')} expert adapters, router "
                              f"{record.get('router')}): " + "; ".join(problems))
    return lora


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """W + scale·B·A in fp32, returned in W's dtype.

    Args:
        weight: [out, in].
        a: [r, in].
        b: [out, r].
        scale: alpha / r.

    Returns:
        The merged weight, [out, in], in `weight`'s dtype.
    """
    merged = weight.float() + scale * (b.float() @ a.float())
    return merged.to(weight.dtype)


def adapted_batch(lora: LoraCheckpoint, batch: list[TensorMapping],
                  loaded: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of `batch` with the adapters merged and the trained router swapped in.

    One read of the LoRA checkpoint serves the whole batch.

    Args:
        lora: The opened LoRA checkpoint.
        batch: The mappings of the base tensors read.
        loaded: The base tensors, one per mapping of `batch` (read from the base checkpoint).
    """
    from sara_megatron.conversion.hf_export import _load_batch

    requests: list[TensorMapping] = []
    plan = []
    for m in batch:
        factors, router = lora.factor_mappings(m), lora.trained_router(m)
        plan.append((len(requests), factors is not None, router is not None))
        requests += list(factors or ()) + ([router] if router is not None else [])
    if not requests:
        return loaded
    # The same shared pair serves every expert of a layer: read each once.
    unique = {(r.key, r.index): r for r in requests}
    order = list(unique)
    values = dict(zip(order, _load_batch(lora.path, [unique[k] for k in order], lora.tensors)))
    out = []
    for (start, has_factors, has_router), tensor in zip(plan, loaded):
        if has_factors:
            a, b = (values[(r.key, r.index)] for r in requests[start: start + 2])
            tensor = merged_weight(tensor, a, b, lora.scale)
        elif has_router:
            r = requests[start]
            tensor = values[(r.key, r.index)].to(tensor.dtype)
        out.append(tensor)
    return out


def export_merged(lora_dir: str | os.PathLike, out: str | os.PathLike, *,
                  base_dir: str | os.PathLike | None = None, **options) -> dict:
    """Write an HF folder `out`: the base of the LoRA checkpoint `lora_dir` with its adapters
    merged (W + (alpha/r)·B·A) and its trained router.

    Args:
        lora_dir: a LoRA run's checkpoint (`iter_N/`).
        out: the HF folder to create.
        base_dir: the base checkpoint, when not the one the record names (its fingerprint must
            match).
        **options: `hf_export.export_hf_checkpoint`'s (overwrite, dtype, max_shard_size, hf_dir,
            read_batch_bytes).

    Returns:
        `export_hf_checkpoint`'s summary.

    Raises:
        ConversionError: no LoRA record, no base, a checkpoint that does not match its record.
        AdapterBaseMismatchError: a base of another fingerprint.
    """
    from sara_megatron.conversion.hf_export import export_hf_checkpoint, refuse_multi_process_launch

    refuse_multi_process_launch()
    lora_dir = os.path.abspath(os.fspath(lora_dir))
    base = resolve_base(lora_dir, lora_record(lora_dir), base_dir and os.fspath(base_dir))

    def adapt(mapping: ModelMapping):
        lora = open_lora_checkpoint(lora_dir, mapping)
        return lambda batch, loaded: adapted_batch(lora, batch, loaded)

    return export_hf_checkpoint(lora_dir, out, weights_dir=base, adapt=adapt, **options)


def _expert_tensors(module: str, by_expert: dict, parameters: list[str], parameter: str
                    ) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one fused expert parameter: its per-expert adapters stacked.

    PEFT's ParamWrapper on a parameter of E experts keeps lora_A: [E·r, in] (expert e's A in
    rows e·r ... e·r + r) and lora_B: [out, E·r] read as [out, r, E] (expert e's B in columns
    j·E + e). Two wrapped parameters of one module nest: the gate_up_proj wrapper is the inner
    one (`base_layer.`), down_proj's the outer, as PEFT builds them from the config.

    Args:
        module: PEFT's name of the experts module, with a trailing dot.
        by_expert: expert → (A [r, in], B [out, r]).
        parameters: the fused parameters adapted in this model (1 or 2 of them).
        parameter: the one these adapters belong to.
    """
    experts = sorted(by_expert)
    if experts != list(range(len(experts))):
        raise ConversionError(f"{module}: adapters of experts {experts}, not of every expert")
    a = torch.cat([by_expert[e][0] for e in experts])
    b = torch.stack([by_expert[e][1] for e in experts], dim=-1).flatten(1)
    inner = len(parameters) == 2 and parameter == "gate_up_proj"
    prefix = module + ("base_layer." if inner else "")
    return {prefix + "lora_A.weight": a.contiguous(), prefix + "lora_B.weight": b.contiguous()}


def export_peft_adapter(lora_dir: str | os.PathLike, out: str | os.PathLike, *,
                        base_dir: str | os.PathLike | None = None, overwrite: bool = False,
                        dtype: str | None = None, hf_dir: str | os.PathLike | None = None) -> dict:
    """Write the adapters of the LoRA checkpoint `lora_dir` as a PEFT adapter folder `out`.

    Args:
        lora_dir: a LoRA run's checkpoint (`iter_N/`).
        out: the folder to create (`adapter_config.json`, `adapter_model.safetensors`).
        base_dir: the base checkpoint, when not the one the record names (its fingerprint must
            match); read only for `router: lora` (the router is saved merged).
        overwrite: replace an existing `out`.
        dtype: "bf16" / "fp32" for the written tensors (default: the checkpoint's).
        hf_dir: config.json source when the checkpoint carries no conversion metadata.

    Returns:
        A summary: out, tensors, target modules.

    Raises:
        ConversionError: expert adapters of a family without their layout here (PhiMoE), a
            checkpoint that does not
            match its record, a base of another fingerprint.
    """
    from safetensors.torch import save_file

    from sara_megatron.conversion.hf_export import (
        DTYPES,
        _load_batch,
        check_finite_tensor,
        checkpoint_source,
        checkpoint_tensor_metadata,
        ensure_process_group,
    )
    from sara_megatron.conversion.mapping import EMBEDDING, build_mapping
    from sara_megatron.models.architecture import from_hf_config

    lora_dir = os.path.abspath(os.fspath(lora_dir))
    output = meta.AtomicOutputDir(out, overwrite)
    output.check()
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ensure_process_group()
    record = lora_record(lora_dir)
    hf_config, _, _ = checkpoint_source(lora_dir, hf_dir and os.fspath(hf_dir))
    arch = from_hf_config(hf_config)
    experts = [t for t in ("experts_fc1", "experts_fc2") if t in record["targets"]]
    if experts and arch.family not in EXPERT_PARAMETERS:
        raise ConversionError(
            f"{lora_dir} adapts the experts ({', '.join(experts)}) of a {arch.family} model; the "
            f"PEFT layout of expert adapters is written for {', '.join(EXPERT_PARAMETERS)} only: "
            "export the merged model with --merge-adapters")
    base = resolve_base(lora_dir, record, base_dir and os.fspath(base_dir)) \
        if record.get("router") == "lora" else None
    base_tensors = checkpoint_tensor_metadata(base) if base else None
    padded = None
    if base_tensors and EMBEDDING in base_tensors:
        padded = tuple(base_tensors[EMBEDDING].global_shape)[0]
    mapping = build_mapping(arch, padded)
    lora = open_lora_checkpoint(lora_dir, mapping)
    out_dtype = DTYPES.get(dtype)
    hub = HUB_NAMES[arch.family]

    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    expert_factors: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for m in mapping.mappings:
        factors = lora.factor_mappings(m)
        if m.key in EXPERT_KEYS:
            if factors is not None:
                layer, expert = m.index
                a, b = _load_batch(lora_dir, list(factors), lora.tensors)
                expert_factors.setdefault((layer, m.key), {})[expert] = (a, b)
            continue
        if m.key == ROUTER and record.get("router") in ("full", "lora"):
            if record["router"] == "full":
                [weight] = _load_batch(lora_dir, [m], lora.tensors)
            else:
                [weight] = _load_batch(base, [m], base_tensors)
                a, b = _load_batch(lora_dir, list(factors), lora.tensors)
                weight = merged_weight(weight, a, b, lora.scale)
            [(name, value)] = m.split(weight).items()
            tensors[PEFT_PREFIX + name] = value  # modules_to_save: PEFT's name is the weight's
            continue
        if factors is None:
            continue
        a, b = _load_batch(lora_dir, list(factors), lora.tensors)
        # B's rows are the weight's rows: split like the weight (fused QKV → q, k, v).
        for name, b_part in dataclasses.replace(m, shape=tuple(b.shape)).split(b).items():
            module = name[: -len("weight")]
            modules.add(module.rstrip(".").rsplit(".", 1)[1])
            tensors[f"{PEFT_PREFIX}{module}lora_A.weight"] = a.clone()  # a file of its own each
            tensors[f"{PEFT_PREFIX}{module}lora_B.weight"] = b_part
    parameters = [EXPERT_PARAMETERS.get(arch.family, {}).get(k)
                  for k in EXPERT_KEYS if any(key == k for _, key in expert_factors)]
    for (layer, key), by_expert in expert_factors.items():
        name = f"{PEFT_PREFIX}{hub.layer.format(i=layer)}{EXPERT_MODULE}."
        tensors.update(_expert_tensors(name, by_expert, parameters,
                                       EXPERT_PARAMETERS[arch.family][key]))
    for name, value in tensors.items():
        check_finite_tensor(name, value, lora_dir)
    tensors = {k: (v.to(out_dtype) if out_dtype else v).contiguous() for k, v in tensors.items()}
    router_name = hub.router.rstrip(".").rsplit(".", 1)[1]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": float(record["alpha"]),
        "lora_dropout": 0.0,  # inference: dropout does nothing
        "target_modules": sorted(modules),
        # transformers' fused expert parameters, adapted per expert by PEFT's ParamWrapper
        "target_parameters": [f"{EXPERT_MODULE}.{p}" for p in parameters] or None,
        "modules_to_save": [router_name] if record.get("router") in ("full", "lora") else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    output.prepare()
    try:
        save_file(tensors, os.path.join(output.partial, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(output.partial, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        output.commit()
    except BaseException:
        output.abort()
        raise
    progress("export", f"wrote a PEFT adapter of {len(tensors)} tensors "
                       f"({', '.join(config['target_modules'])}"
                       f"{', router saved whole' if config['modules_to_save'] else ''}) to "
                       f"{output.out}")
    return {"out": output.out, "tensors": len(tensors), "target_modules": config["target_modules"],
            "modules_to_save": config["modules_to_save"]}
