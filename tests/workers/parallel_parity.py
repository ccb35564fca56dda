"""torchrun worker: layouts' loss and dense routing vs the single-rank model on the same weights.

Each case of --cases names a preset and a layout. Per preset, phase 1 builds the model at
TP=EP=PP=1 (every rank identical) and records the reference: mean token loss over the whole batch
and each layer's captured sequence-mean routing; it saves the weights with dist_checkpointing.
Phase 2, per case, re-initialises Megatron at the case's layout, loads the weights and runs the
same batch through megatron's pipeline schedule with backward. Rank 0 writes both to
<out-dir>/<case>.json as each case ends. The batch has padding, so the masks are exercised. One
launch runs many cases: the processes start once and each reference is built once.

With objectives in a case (aes, kl, js_entropy_normalised, shifcon) each objective's
term alone is also run forward and backward on both sides (the CE output is multiplied by 0): its
value, the squared norm of its whole gradient and each router's gradient, reduced over the ranks
that hold them; "online" adds the online priors taken through the layout's schedule;
"load_balancing" is megatron's load-balancing loss alone under per-token loss (the training
convention), whose gradient scale is the one megatron-core versions differ on, with the padding
mask and without one ("load_balancing_unmasked": padding counted as tokens).

"lora" / "lora_shared" (`LORA_VARIANTS`): a fresh model on the same weights gets LoRA adapters
(B initialised non-zero so that every factor has a gradient) and runs the CE forward and backward;
its loss and every adapter's (and trained router's) gradient, reduced as megatron's DDP and
finalize_model_grads reduce them and gathered to whole tensors, are compared with the single
rank's.
"""

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights, save_model_weights
from sara_megatron.compat.megatron_versions import (
    LOAD_BALANCING_LOSS,
    aux_loss_values,
    reduced_aux_loss_values,
    zero_aux_losses,
)
from sara_megatron.distributed import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    model_process_groups,
)
from sara_megatron.io import write_json_atomic
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.peft import LoraSettings, adapters, apply_lora
from sara_megatron.routing import capture_routing, segment_ids_from_padding_mask

BATCH, SEQ = 4, 16


def make_batch(vocab: int):
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[1, 11:] = True  # right padding
    padding[3, :3] = True  # left padding
    labels = torch.roll(tokens, -1, dims=1)
    return tokens, labels, padding


def run_model(model, tokens, labels, padding, layers):
    """Forward + backward through megatron's schedule; returns (loss_sum, token_count, capture).
    Under context parallel each rank feeds its part of every sequence."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    seq_length = tokens.shape[1]
    positions = torch.arange(seq_length).expand_as(tokens)
    tokens, labels, padding, positions = (
        context_parallel_slice(t, cp_rank, cp) for t in (tokens, labels, padding, positions)
    )

    models = model if isinstance(model, list) else [model]
    captures = []
    sums = []

    def loss_func(loss_mask, per_token_loss):
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        sums.append(torch.stack([loss_sum.detach(), loss_mask.sum()]))
        return loss_sum, {}

    def forward_step(data_iterator, chunk):
        tok, lab, pad = next(data_iterator)
        ctx = capture_routing(chunk, segment_ids_from_padding_mask(pad), layers=layers,
                              process_groups=model_process_groups())
        capture = ctx.__enter__()
        try:
            out = chunk(tok, positions, causal_attention_mask(tok.shape[1]), labels=lab)
        finally:
            ctx.__exit__(None, None, None)
        captures.append(capture)
        return out, lambda t: loss_func((~pad).float(), t)

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([(tokens, labels, padding)]),
        model=models,
        num_microbatches=1,
        seq_length=seq_length,
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    routing = {}
    for capture in captures:
        for layer, rec in capture.records.items():
            routing[layer] = rec.seq_mean
    return (sums[0] if sums else None), routing


def _moe_layers(models):
    return [m for chunk in models for m in chunk.modules()
            if hasattr(m, "token_dispatcher") and hasattr(m, "experts")]


SHIFCON_LANGUAGES = ["hi", "en", "hi", "hi"]  # one per batch row; en is the anchor


def _shifcon(hidden_size, row_offset, rows, process_groups):
    """ShifCon with its released contrast (symmetric over the samples gathered across data
    parallel, averaged over the inputs of layers 1 and 2) and fixed random vectors and anchors
    (the same on every rank); rows summed. `process_groups` None: this rank is the whole run."""
    from sara_megatron.sara.shifcon import ShifconObjective
    from sara_megatron.sara.shifcon_vectors import LanguageVectors

    g = torch.Generator().manual_seed(5)
    vectors = LanguageVectors((1, 3), {lang: torch.randn(2, hidden_size, generator=g)
                                       for lang in ("en", "hi")}, "en", "fp", {"en": 1, "hi": 1})
    anchors = {layer: torch.randn(BATCH, hidden_size, generator=g) for layer in (1, 2)}
    objective = ShifconObjective(vectors, 1, 3, 0.7, 0.5, process_groups=process_groups,
                                 symmetric=True, contrast_layers="area")
    objective.sequence_weight = 1.0
    languages = SHIFCON_LANGUAGES[row_offset:row_offset + rows]
    return objective, lambda pad: objective.set_batch(languages, pad, anchors, row_offset)


def run_objective(model, tokens, padding, priors, objective, reduce=True, row_offset=0):
    """Forward + backward of one objective's term alone (summed over sequences or tokens, so
    data-parallel ranks add up); returns (value, gradient norm², {layer: router gradient}).
    reduce=False: this rank's model is the whole model (the reference; nothing to reduce)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sara_megatron.routing import observe_routers
    from sara_megatron.sara import SaraRoutingLoss
    from sara_megatron.sara.aes import AesLoss

    models = model if isinstance(model, list) else [model]
    for chunk in models:
        chunk.zero_grad(set_to_none=True)
    handles = []
    set_batch = None
    observer = None
    per_token = objective.startswith("load_balancing")
    if per_token:
        # Per-token loss as in training (the routers read it at construction, the schedule from
        # the config: it then scales aux losses by the loss scale alone), and the routers'
        # training branch, which adds the aux loss; the rest of the model stays in eval mode.
        models[0].config.calculate_per_token_loss = True
        for moe in _moe_layers(models):
            moe.router.calculate_per_token_loss = True
            moe.router.train()
        zero_aux_losses()
    elif objective == "shifcon":
        observer, set_batch = _shifcon(models[0].config.hidden_size, row_offset, tokens.shape[0],
                                       model_process_groups() if reduce else None)
        handles = observer.attach(models)
    elif objective == "aes":
        observer = AesLoss(3.0, 50.0)
        observer.token_weight = 1.0  # Σ over tokens: data-parallel shares add up
        handles = observer.attach(models)
    else:
        observer = SaraRoutingLoss(list(range(priors.shape[0])), 1.5, divergence=objective,
                                   sequence_parallel=models[0].config.sequence_parallel,
                                   process_groups=model_process_groups())
        observer.sequence_weight = 1.0  # Σ over sequences
    # Under context parallel each rank feeds its part of every sequence, as in run_model.
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    seq_length = tokens.shape[1]
    positions = torch.arange(seq_length).expand_as(tokens)
    tokens, padding, positions = (
        context_parallel_slice(t, cp_rank, cp) for t in (tokens, padding, positions)
    )

    def forward_step(data_iterator, chunk):
        tok, pad, pri = next(data_iterator)
        if set_batch is not None:
            set_batch(pad)
        elif objective in ("kl", "js_entropy_normalised"):
            observer.set_batch(pri, segment_ids_from_padding_mask(pad))
        out = chunk(tok, positions, causal_attention_mask(tok.shape[1]), labels=tok,
                    padding_mask=None if objective == "load_balancing_unmasked" else pad)
        if per_token:  # (loss sum, its token count, metrics)
            return out, lambda t: ((t.float() * 0).sum(), torch.ones((), dtype=torch.int), {})
        return out, lambda t: ((t.float() * 0).sum(), {})

    with (observe_routers(models, observer) if observer is not None and objective != "shifcon"
          else contextlib.nullcontext()):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(tokens, padding, priors)]),
            model=models, num_microbatches=1, seq_length=seq_length,
            micro_batch_size=tokens.shape[0], forward_only=False,
        )
    for handle in handles:
        handle.remove()

    if per_token:
        models[0].config.calculate_per_token_loss = False
        for moe in _moe_layers(models):
            moe.router.calculate_per_token_loss = False
            moe.router.eval()
        values = (reduced_aux_loss_values if reduce else aux_loss_values)(LOAD_BALANCING_LOSS)
        value = float(values.sum())
    elif objective == "shifcon":
        value = float(observer.loss_sum)
    elif objective == "aes":
        value = sum(float(row[0] * -3.0 + row[2] * 50.0) for row in observer.stats.values())
    else:
        # Every rank of a TP×CP group holds the same sums: count them once.
        from sara_megatron.routing.capture import routing_reduction_group

        group = routing_reduction_group(model_process_groups()) if reduce else None
        owner = group is None or dist.get_rank(group) == 0
        value = sum(float(v) for v in observer.js_sum.values()) if owner else 0.0
    total = torch.tensor([value], dtype=torch.float64)
    if reduce and not per_token:
        dist.all_reduce(total)
    # Gradients: dense ones summed over data × context parallel (CP ranks saw other tokens of the
    # same sequences), expert ones over expert data parallel (which spans CP),
    # and parameters not split by TP (norms, routers: each TP rank saw other tokens) over TP;
    # each then counted once in the world's sum of squares.
    tp_group = ps.get_tensor_model_parallel_group()
    squares = torch.zeros(1, dtype=torch.float64)

    def reduced(param):
        grad = param.grad.detach().double().clone()
        if not reduce:
            return grad, True
        expert = not getattr(param, "allreduce", True)
        group = (ps.get_expert_data_parallel_group() if expert
                 else ps.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(grad, group=group)
        owner = dist.get_rank(group) == 0
        if not getattr(param, "tensor_model_parallel", False) and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(grad, group=tp_group)
            owner = owner and dist.get_rank(tp_group) == 0
        return grad, owner

    for chunk in models:
        for param in chunk.parameters():
            if param.grad is None:
                continue
            grad, owner = reduced(param)
            if owner:
                squares += grad.pow(2).sum()
    if reduce:
        dist.all_reduce(squares)
    routers = {}
    for moe in _moe_layers(models):
        grad, _ = reduced(moe.router.weight)
        routers[moe.router.global_layer_index] = grad.flatten().tolist()
    return float(total), float(squares), routers


LORA_VARIANTS = {
    "lora": dict(expert_adapters="per_expert", router="lora"),
    "lora_shared": dict(expert_adapters="shared", router="full"),
}


def _lora_model(arch, ckpt: str, variant: str):
    model = build_model(arch)
    load_model_weights(model, ckpt)
    apply_lora([model], LoraSettings(
        rank=4, alpha=8.0, seed=3, b_init_std=0.05,
        targets=("attention_qkv", "attention_proj", "experts_fc1", "experts_fc2"),
        **LORA_VARIANTS[variant]))
    model.eval()
    return model


def lora_gradients(models, reduce: bool) -> dict:
    """{global adapter name + ".lora_a"/".lora_b", "layerN.router.weight": whole gradient} of
    this rank's adapters: summed over data parallel (expert adapters over expert data parallel),
    over TP where megatron's finalize_model_grads sums (the `sequence_parallel` mark), and the TP
    shards gathered (column B by rows, [gate; up] for linear_fc1; row A by columns)."""
    from megatron.core import parallel_state as ps

    def reduced(param):
        grad = (param.grad if param.grad is not None else torch.zeros_like(param)).double().clone()
        if reduce:
            expert = not getattr(param, "allreduce", True)
            dist.all_reduce(grad, group=ps.get_expert_data_parallel_group() if expert
                            else ps.get_data_parallel_group(with_context_parallel=True))
            if getattr(param, "sequence_parallel", False):
                dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad

    def whole(grad, group, dim, gated):
        size = dist.get_world_size(group) if reduce else 1
        if dim is None or size == 1:
            return grad
        parts = [torch.empty_like(grad) for _ in range(size)]
        dist.all_gather(parts, grad.contiguous(), group=group)
        if gated:
            halves = [part.chunk(2, 0) for part in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
        return torch.cat(parts, dim)

    grads = {}
    for module, adapter in adapters(models):
        group = getattr(module, "tp_group", None)
        grads[adapter.name + ".lora_a"] = whole(reduced(adapter.a), group,
                                                1 if adapter.column is False else None, False)
        grads[adapter.name + ".lora_b"] = whole(reduced(adapter.b), group,
                                                0 if adapter.column else None, adapter.gated)
    for moe in _moe_layers(models):
        if moe.router.weight.requires_grad:
            grads[f"layer{moe.router.global_layer_index}.router.weight"] = reduced(moe.router.weight)
    return grads


def _merge_rows(gathered):
    merged = {}
    for part in gathered:
        for layer, (start, rows) in part.items():
            merged.setdefault(layer, {})[start] = rows
    return merged


def _merge_routers(routers):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, routers)
    merged = {}
    for part in gathered:
        for layer, grad in part.items():
            merged[str(layer)] = grad
    return merged


def reference(preset: str, objectives: list[str], ckpt: str) -> dict:
    """The single-rank side of `preset` (every rank identical): loss sums, routing, priors and
    each objective's term; the weights saved to `ckpt` for the layouts to load."""
    initialize_distributed(ParallelConfig())
    arch = get_preset(preset)
    layers = list(range(arch.num_layers))
    tokens, labels, padding = make_batch(arch.vocab_size)
    model = build_model(arch)
    model.eval()  # deterministic routing (sparsemixer samples in training mode)
    sums, routing = run_model(model, tokens, labels, padding, layers)
    torch.manual_seed(99)  # the same priors on every rank
    priors = torch.distributions.Dirichlet(torch.full((arch.num_experts,), 0.5)).sample(
        (len(layers), BATCH))
    terms = [o for o in objectives if o != "online" and o not in LORA_VARIANTS]
    ref_objectives = {o: run_objective(model, tokens, padding, priors, o, reduce=False)
                      for o in terms}
    save_model_weights(model, ckpt)
    lora = {}
    for variant in [o for o in objectives if o in LORA_VARIANTS]:
        adapted = _lora_model(arch, ckpt, variant)
        lora_sums, _ = run_model(adapted, tokens, labels, padding, layers)
        lora[variant] = ((lora_sums[0] / lora_sums[1]).item(),
                         lora_gradients([adapted], reduce=False))
    return {"arch": arch, "layers": layers, "batch": (tokens, labels, padding), "sums": sums,
            "routing": routing, "priors": priors, "objectives": ref_objectives, "lora": lora}


def run_layout(ref: dict, case: dict, ckpt: str):
    """One layout against its preset's reference; the result dict on rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # no state from the previous case
    objectives = case.get("objectives", [])
    arch, layers, priors = ref["arch"], ref["layers"], ref["priors"]
    tokens, labels, padding = ref["batch"]
    initialize_distributed(ParallelConfig(tp=case.get("tp", 1), ep=case.get("ep", 1),
                                          pp=case.get("pp", 1), cp=case.get("cp", 1)))
    model = build_model(arch)
    load_model_weights(model, ckpt)
    model.eval()
    # Data parallel ranks (EP folds into them) take disjoint slices of the batch.
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    sums, routing = run_model(model, tokens[rows], labels[rows], padding[rows], layers)
    terms = [o for o in objectives if o != "online" and o not in LORA_VARIANTS]
    layout_objectives = {o: run_objective(model, tokens[rows], padding[rows], priors[:, rows], o,
                                          row_offset=rows.start)
                         for o in terms}
    ref_objectives = ref["objectives"]
    objective_results = {
        o: {"ref": {"value": ref_objectives[o][0], "grad_sq": ref_objectives[o][1],
                    "routers": {str(k): v for k, v in ref_objectives[o][2].items()}},
            "layout": {"value": layout_objectives[o][0], "grad_sq": layout_objectives[o][1],
                       "routers": _merge_routers(layout_objectives[o][2])}}
        for o in terms}
    online = {}
    if "online" in objectives:
        # Online priors: the anchor forward through the schedule; the rows here are the batch's.
        from types import SimpleNamespace

        from sara_megatron.sara.online_priors import online_anchor_priors

        anchors = SimpleNamespace(anchor_tokens=tokens[rows], anchor_padding_mask=padding[rows])
        online_priors = online_anchor_priors([model], [anchors], layers, arch.num_experts,
                                             torch.device("cpu"), model_process_groups())[0]
        online = {layer: (rows.start, online_priors[i].tolist())
                  for i, layer in enumerate(layers) if layer in routing}
    gathered_online = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_online, online)
    lora = {}
    for variant in [o for o in objectives if o in LORA_VARIANTS]:
        adapted = _lora_model(arch, ckpt, variant)
        lora_sums, _ = run_model(adapted, tokens[rows], labels[rows], padding[rows], layers)
        lora_total = lora_sums if lora_sums is not None else torch.zeros(2)
        dist.all_reduce(lora_total, group=ps.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(lora_total, group=ps.get_pipeline_model_parallel_group())
        grads = lora_gradients([adapted], reduce=True)
        gathered_grads = [None] * dist.get_world_size()
        dist.all_gather_object(gathered_grads, grads)
        merged = {name: grad for part in gathered_grads for name, grad in part.items()}
        ref_loss, ref_grads = ref["lora"][variant]
        lora[variant] = {
            "ref_loss": ref_loss, "loss": (lora_total[0] / lora_total[1]).item(),
            "names": sorted(merged), "ref_names": sorted(ref_grads),
            "max_diff": {n: (merged[n] - ref_grads[n]).abs().max().item()
                         for n in ref_grads if n in merged},
            "ref_max": {n: g.abs().max().item() for n, g in ref_grads.items()},
        }

    # Loss lives on the last stage (zeros elsewhere): sum over data (and context) parallel and
    # pipeline.
    total = sums if sums is not None else torch.zeros(2)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    # Each layer's routing lives on its stage and DP rank's rows; gather to rank 0.
    mine = {layer: (rows.start, mean.tolist()) for layer, mean in routing.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return None
    # TP and CP ranks report the same rows under the same start offset: the dict keeps one.
    layout_routing = {layer: [row for start in sorted(parts) for row in parts[start]]
                      for layer, parts in _merge_rows(gathered).items()}
    ref_sums = ref["sums"]
    return {
        "ref_loss": (ref_sums[0] / ref_sums[1]).item(),
        "loss": (total[0] / total[1]).item(),
        "ref_routing": {str(k): v.tolist() for k, v in ref["routing"].items()},
        "routing": {str(k): v for k, v in layout_routing.items()},
        "layers_by_rank": [sorted(part) for part in gathered],
        "objectives": objective_results,
        "lora": lora,
        "online_priors": {str(layer): [row for start in sorted(parts) for row in parts[start]]
                          for layer, parts in _merge_rows(gathered_online).items()},
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True,
                   help="JSON list of {name, preset, tp, ep, pp, cp, objectives}; objectives among "
                        "aes, kl, js_entropy_normalised, shifcon, online, lora, lora_shared")
    p.add_argument("--out-dir", required=True, help="<name>.json per case, written as each ends")
    args = p.parse_args()
    cases = json.loads(args.cases)
    out_dir = Path(args.out_dir)
    # One launch runs every case: the processes start once and each preset's reference is built
    # once, with the union of its cases' objectives.
    for preset in dict.fromkeys(c["preset"] for c in cases):
        mine = [c for c in cases if c["preset"] == preset]
        objectives = list(dict.fromkeys(o for c in mine for o in c.get("objectives", [])))
        ckpt = str(out_dir / f"ckpt-{preset}")
        ref = reference(preset, objectives, ckpt)
        for case in mine:
            result = run_layout(ref, case, ckpt)
            if result is not None:
                write_json_atomic(out_dir / f"{case['name']}.json", result)
    destroy_distributed()


if __name__ == "__main__":
    main()
