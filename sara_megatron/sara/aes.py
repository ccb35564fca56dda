"""AES (Guo et al., 2025, "Advancing Expert Specialization for Better MoE") as a baseline objective.

    L = CE + λ_LB·LB − w_var·L_var + w_orth·L_orth      on every MoE layer (summed over layers)

L_var (the variance over experts of each token's routing softmax) is a router observer; L_orth
(each token's experts' outputs projected onto one another) is a forward hook on each MoE layer's
experts, summed over the dispatcher's TP×EP group and attached with `MoEAuxLossAutoScaler`. Both
follow megatron's per-token convention through `token_weight`; an unset coefficient is
self-calibrated to a power of ten before the first step. Details, calibration ways and tests:
docs/objectives.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from sara_megatron.sara.reduction import all_reduce_identity_backward


def routing_variance(logits: torch.Tensor) -> torch.Tensor:
    """Each token's variance over experts of its fp32 routing softmax (unbiased, as torch.var).

    Args:
        logits: [T, N] router logits.

    Returns:
        [T] fp32 variances.
    """
    return torch.softmax(logits.float(), dim=-1).var(dim=-1)


CALIBRATIONS = ("measured", "authors")


def power_of_ten(target: float, value: float) -> float:
    """The coefficient that brings `value` to `target` rounded to a power of ten:
    10^round(log10(target / value)); 0 when the target is 0 or the value is not positive.

    Args:
        target: the term's wanted value.
        value: the term's measured value at coefficient 1.
    """
    if target == 0 or not value > 0:
        return 0.0
    return 10.0 ** round(math.log10(target / value))


def router_rows_orthogonality(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The authors' calibration value for the orthogonality term, from a router's weight rows.

    The released code calibrates on the router weight [N, H] in place of expert outputs: for each
    of the first k rows w_i, the squared norm of its projection onto the span of the other N−1
    rows, averaged over the k rows.

    Args:
        weight: the router weight, [N experts, H].
        k: the router's top-k.

    Returns:
        A float64 scalar tensor.
    """
    rows = weight.detach().double()
    total = rows.new_zeros(())
    for i in range(min(k, rows.shape[0])):
        others = torch.cat([rows[:i], rows[i + 1:]])  # [N-1, H]
        basis, _ = torch.linalg.qr(others.t())  # [H, min(H, N-1)]
        total = total + (basis.t() @ rows[i]).pow(2).sum()
    return total / k


def orthogonality_per_token(outputs: torch.Tensor) -> torch.Tensor:
    """Each token's mean over i of ‖projection of outputs[:, i] onto span(outputs[:, j≠i])‖².

    A token with an all-zero slot (a padding token the dispatcher did not send, an expert that
    output nothing) would make the QR's backward divide by zero, NaN even where the token is
    masked out afterwards: such tokens bypass the QR (it sees a fixed well-conditioned stand-in)
    and take the value from `_orthogonality_zero_safe`, in which a zero slot spans nothing. Other
    tokens' values are the QR's, unchanged.

    Args:
        outputs: [T, k, H] each token's k experts' (unweighted) outputs.

    Returns:
        [T] fp32 values; zeros when k = 1 (no other expert).
    """
    t, k, h = outputs.shape
    if k < 2:
        return outputs.new_zeros(t)
    outputs = outputs.float()
    degenerate = (outputs == 0).all(-1).any(-1)  # [T]
    stand_in = torch.eye(k, h, dtype=outputs.dtype, device=outputs.device)
    safe = torch.where(degenerate[:, None, None], stand_in, outputs)
    total = outputs.new_zeros(t)
    for i in range(k):
        others = torch.cat([safe[:, :i], safe[:, i + 1:]], dim=1)  # [T, k-1, H]
        basis, _ = torch.linalg.qr(others.transpose(1, 2))  # [T, H, k-1], orthonormal columns
        coefficients = torch.einsum("thj,th->tj", basis, safe[:, i])
        total = total + coefficients.pow(2).sum(-1)
    total = torch.where(degenerate, 0.0, total / k)
    if bool(degenerate.any()):
        index = degenerate.nonzero()[:, 0]
        total = total.index_put((index,), _orthogonality_zero_safe(outputs[index]))
    return total


def _orthogonality_zero_safe(outputs: torch.Tensor) -> torch.Tensor:
    """[T] the same projection value by Gram–Schmidt, a zero vector contributing no direction
    (its normalisation guarded so the gradient stays finite). For the few degenerate tokens."""
    t, k, _ = outputs.shape
    total = outputs.new_zeros(t)
    for i in range(k):
        basis = []
        for j in range(k):
            if j == i:
                continue
            v = outputs[:, j]
            for u in basis:
                v = v - (u * v).sum(-1, keepdim=True) * u
            norm = v.norm(dim=-1, keepdim=True)
            nonzero = norm > 0
            basis.append(torch.where(nonzero, v / torch.where(nonzero, norm, 1.0), 0.0))
        total = total + sum((u * outputs[:, i]).sum(-1).pow(2) for u in basis)
    return total / k


class AesLoss:
    """Router observer (L_var) plus experts hooks (L_orth); see the module docstring.

    Install it with `routing.observers.observe_routers` and `attach`; the trainer sets
    `token_weight` (loss tokens / non-padding tokens of the global batch) every step.
    Constructor arguments: see `__init__`.
    """

    def __init__(self, variance_coeff: Optional[float], orthogonality_coeff: Optional[float],
                 variance_target: float = 1e-3, orthogonality_target: float = 1e-4,
                 calibration: str = "measured",
                 process_groups: Optional[ProcessGroupCollection] = None):
        """Args:
            variance_coeff: w_var; None: calibrated (`calibrate`) before it attaches anything.
            orthogonality_coeff: w_orth; None: calibrated likewise.
            variance_target: The variance term's target value for the calibration.
            orthogonality_target: The orthogonality term's target value for the calibration.
            calibration: How an unset coefficient's value is measured, one of CALIBRATIONS.
            process_groups: Megatron's groups (the authors' calibration reads data-parallel
                rank 0's first micro-batch); None is one process alone.

        Raises:
            ValueError: An unknown calibration.
        """
        if calibration not in CALIBRATIONS:
            raise ValueError(f"AES calibration {calibration!r}: one of {', '.join(CALIBRATIONS)}")
        self.calibration = calibration
        self.process_groups = process_groups
        self.calibration_values: dict[str, dict[str, float]] = {}
        self._routers: dict[int, torch.nn.Module] = {}
        self.variance_coeff = variance_coeff
        self.orthogonality_coeff = orthogonality_coeff
        self.variance_target = variance_target
        self.orthogonality_target = orthogonality_target
        self.token_weight: Optional[float] = None
        self._padding: dict[int, Optional[torch.Tensor]] = {}
        self.reset_stats()

    @property
    def calibrated(self) -> bool:
        """Whether both coefficients are set (nothing is attached before)."""
        return self.variance_coeff is not None and self.orthogonality_coeff is not None

    def reset_stats(self) -> None:
        """Per layer: [Σ ℓ_var, tokens, Σ ℓ_orth, tokens] over this rank's share (for logging)."""
        self.stats: dict[int, torch.Tensor] = {}
        self.first_call: dict[int, torch.Tensor] = {}  # layer -> [Σ ℓ_var, tokens], first call

    def _add_stats(self, layer: int, offset: int, value_sum, count) -> None:
        row = self.stats.setdefault(layer, torch.zeros(4, dtype=torch.float64,
                                                       device=value_sum.device))
        row[offset] += value_sum.detach().double()
        row[offset + 1] += float(count) if not torch.is_tensor(count) else count.double()

    def _scale(self, coeff, count) -> float:
        if self.token_weight is None:
            return coeff / max(float(count), 1.0)
        return coeff * self.token_weight

    # --- L_var: router observer ----------------------------------------------------------------

    def __call__(self, layer: int, logits: torch.Tensor, padding_mask) -> Optional[torch.Tensor]:
        flat = logits.reshape(-1, logits.shape[-1])
        valid = (torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
                 if padding_mask is None else ~padding_mask.reshape(-1).to(flat.device))
        self._padding[layer] = valid
        variance = torch.where(valid, routing_variance(flat), 0.0).sum()
        count = valid.sum()
        self._add_stats(layer, 0, variance, count)
        if layer not in self.first_call:  # the first micro-batch this rank sends through it
            self.first_call[layer] = torch.stack([variance.detach().double().cpu(),
                                                  count.double().cpu()])
        if self.variance_coeff is None:  # measuring for calibration: nothing attached
            return None
        return -variance * self._scale(self.variance_coeff, count)

    # --- L_orth: hooks on the experts ----------------------------------------------------------

    def attach(self, chunks) -> list:
        """Register the orthogonality hook on every MoE layer of `chunks`.

        Args:
            chunks: This rank's bare model chunks.

        Returns:
            The hook handles.

        Raises:
            ValueError: A MoE layer uses another token dispatcher than allgather.
        """
        from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

        handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if hasattr(module, "token_dispatcher") and hasattr(module, "experts"):
                    if not isinstance(module.token_dispatcher, MoEAllGatherTokenDispatcher):
                        # The slots are read in the allgather dispatcher's token space; the
                        # alltoall one (megatron's GPU default) would need its inverse exchange.
                        # The trainer's preflight refuses it before a model is built.
                        raise ValueError(
                            "the AES orthogonality term reads the allgather token dispatcher's "
                            f"tokens, not the {type(module.token_dispatcher).__name__}'s: set "
                            "model.token_dispatcher: allgather")
                    handles.append(module.experts.register_forward_hook(self._experts_hook(module)))
                    self._routers[module.router.global_layer_index] = module.router
        return handles

    def _experts_hook(self, moe_layer):
        def hook(experts, args, output):
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

            expert_output, bias = output
            loss = self._orthogonality(moe_layer, args, expert_output)
            if loss is None:
                return None
            return MoEAuxLossAutoScaler.apply(expert_output, loss), bias
        return hook

    def _orthogonality(self, moe_layer, args, expert_output) -> Optional[torch.Tensor]:
        _, tokens_per_expert, permuted_probs = args
        dispatcher = moe_layer.token_dispatcher
        layer = moe_layer.router.global_layer_index
        local_map = dispatcher.local_map  # [T_group, E_local] bool
        token = dispatcher.reversed_local_input_permutation_mapping.long()  # [n], expert-major
        num_tokens, num_local = local_map.shape
        k = moe_layer.router.topk
        group = dispatcher.tp_ep_group
        group_size = dist.get_world_size(group) if group is not None else 1

        counts = tokens_per_expert.to(token.device).long()
        expert = torch.repeat_interleave(torch.arange(num_local, device=token.device), counts)
        # Slot of (token, expert) among the token's k experts: its rank among the token's local
        # experts, after the experts of lower EP ranks (TP ranks of one EP rank share experts).
        rank_in_token = (local_map.long().cumsum(1) - 1)[token, expert]
        offset = torch.zeros(num_tokens, dtype=torch.long, device=token.device)
        ep_group = dispatcher.ep_group
        if dispatcher.ep_size > 1:
            per_rank = [torch.empty(num_tokens, dtype=torch.long, device=token.device)
                        for _ in range(dispatcher.ep_size)]
            dist.all_gather(per_rank, local_map.long().sum(1), group=ep_group)
            ep_rank = dist.get_rank(ep_group)
            for r in range(ep_rank):
                offset += per_rank[r]
        slot = rank_in_token + offset[token]

        probs = permuted_probs.float().unsqueeze(-1)
        raw = expert_output.float() / torch.where(probs > 0, probs, torch.ones_like(probs))
        slots = expert_output.new_zeros(num_tokens, k, expert_output.shape[-1], dtype=torch.float32)
        slots = slots.index_put((token, slot), raw)
        if group_size > 1:
            slots = all_reduce_identity_backward(slots, group)

        valid = self._padding.get(layer)
        if valid is None or valid.numel() * group_size != num_tokens:
            valid = torch.ones(num_tokens // group_size, dtype=torch.bool, device=token.device)
        if group_size > 1:
            gathered = [torch.empty_like(valid) for _ in range(group_size)]
            dist.all_gather(gathered, valid.contiguous(), group=group)
            valid = torch.cat(gathered)
        per_token = torch.where(valid, orthogonality_per_token(slots), 0.0)
        total, count = per_token.sum(), valid.sum()
        # Stats once per group (every rank of it computed the same sum).
        owner = group_size == 1 or dist.get_rank(group) == 0
        self._add_stats(layer, 2, total if owner else total * 0, count if owner else 0)
        if self.orthogonality_coeff is None:
            return None
        return total * self._scale(self.orthogonality_coeff, count)

    # --- logging and calibration ---------------------------------------------------------------

    def reduced_layer_means(self) -> dict[str, dict[int, float]]:
        """Each term's per-layer token mean since `reset_stats`, over every rank (collective).

        Returns:
            {"variance": {layer: mean}, "orthogonality": {layer: mean}}, global 0-based layers.
        """
        layers = sorted(self.stats)
        width = 1 + max([int(x) for x in layers], default=-1)
        table = torch.zeros(max(width, 1), 4, dtype=torch.float64)
        for layer, row in self.stats.items():
            table[layer] = row.cpu()
        if dist.is_initialized():
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.cuda.is_available() else torch.device("cpu"))
            size = torch.tensor([table.shape[0]], device=device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX)
            full = torch.zeros(int(size), 4, dtype=torch.float64, device=device)
            full[: table.shape[0]] = table.to(device)
            dist.all_reduce(full)
            table = full.cpu()
        seen = [i for i in range(table.shape[0]) if table[i, 1] > 0]
        return {"variance": {i: float(table[i, 0] / table[i, 1]) for i in seen},
                "orthogonality": {i: float(table[i, 2] / table[i, 3].clamp_min(1)) for i in seen}}

    def authors_values(self, num_layers: int) -> dict[str, float]:
        """The values the authors' calibration reads, at the first MoE layer of the model:
        {"variance": token mean on data-parallel rank 0's first micro-batch since
        `reset_stats`, "orthogonality": `router_rows_orthogonality` of its router}.
        Collective over the world.

        Args:
            num_layers: the model's layer count (bounds the layer indices).
        """
        table = torch.zeros(max(num_layers, 1), 4, dtype=torch.float64)
        if self._routers:
            first = min(self._routers)
            router = self._routers[first]
            table[first, 2] = float(router_rows_orthogonality(router.weight, router.topk))
            table[first, 3] = 1.0
        dp_rank = (dist.get_rank(self.process_groups.dp) if self.process_groups is not None
                   else 0)
        if dp_rank == 0:
            for layer, row in self.first_call.items():
                table[layer, :2] = row
        if dist.is_initialized():
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.cuda.is_available() else torch.device("cpu"))
            table = table.to(device)
            dist.all_reduce(table)
            table = table.cpu()
        owned = [i for i in range(table.shape[0]) if table[i, 3] > 0]
        if not owned:
            return {"variance": 0.0, "orthogonality": 0.0}
        first = owned[0]
        return {"variance": float(table[first, 0] / table[first, 1].clamp_min(1)),
                "orthogonality": float(table[first, 2] / table[first, 3])}

    def calibrate(self, num_layers: int) -> dict[str, dict[str, float]]:
        """Set unset coefficients by `self.calibration` from the statistics of a forward pass
        since `reset_stats` (collective). Both ways are measured; returns
        {way: {"variance": value, "orthogonality": value, "variance_coeff": c,
        "orthogonality_coeff": c}} for logging, also kept in `calibration_values`.

        Args:
            num_layers: the model's layer count.

        Returns:
            The two ways' values and coefficients, as above.
        """
        means = self.reduced_layer_means()
        measured = {term: sum(v.values()) / max(len(v), 1) for term, v in means.items()}
        result = {}
        for way, values in (("measured", measured), ("authors", self.authors_values(num_layers))):
            result[way] = dict(values, variance_coeff=power_of_ten(self.variance_target,
                                                                   values["variance"]),
                               orthogonality_coeff=power_of_ten(self.orthogonality_target,
                                                                values["orthogonality"]))
        self.calibration_values = result
        if self.calibration == "measured":
            self.calibrate_from(means)
        else:
            if self.variance_coeff is None:
                self.variance_coeff = result["authors"]["variance_coeff"]
            if self.orthogonality_coeff is None:
                self.orthogonality_coeff = result["authors"]["orthogonality_coeff"]
        return result

    def calibrate_from(self, means: dict[str, dict[int, float]]) -> None:
        """Set unset coefficients to 10^round(log10(target / layer-mean value)).

        Args:
            means: per-layer means as `reduced_layer_means` returns them.
        """
        def layer_mean(values):
            values = list(values)
            return sum(values) / max(len(values), 1)

        if self.variance_coeff is None:
            self.variance_coeff = power_of_ten(self.variance_target,
                                               layer_mean(means["variance"].values()))
        if self.orthogonality_coeff is None:
            self.orthogonality_coeff = power_of_ten(self.orthogonality_target,
                                                    layer_mean(means["orthogonality"].values()))
