"""The Phi-3.5-MoE (PhiMoE) pieces Megatron-Core lacks.

- `SparseMixerRouter`: sparsemixer top-2 routing (transformers' `phimoe` `sparsemixer`), eval and
  training behaviour, as a Megatron router that shows its logits to the routing observers.
- `add_input_jitter`: PhiMoE's multiplicative input jitter on each `MoELayer` (training only).
- `RowParallelLinearWithBias` (and a TE twin): attention output projection with a bias while
  `add_bias_linear=False` keeps router and experts bias-free.
- `add_output_layer_bias`: the lm_head bias on the vocab-parallel output layer.
- `LongRopeRotaryEmbedding`: Phi-3 "longrope" (short factors up to the switch, long beyond);
  its mscale is folded into the attention softmax scale (see `attention_softmax_scale`).

`builder.py` calls the three entry points at the bottom: `phimoe_config_kwargs` (extra
`TransformerConfig` arguments), `customize_phimoe_layer_spec` and `finish_phimoe_model`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import (
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

from sara_megatron.compat.megatron_versions import module_submodules
from sara_megatron.models.architecture import LongRopeScaling, MoEArchitecture
from sara_megatron.models.context_parallel import ContextParallelDotProductAttention
from sara_megatron.models.router import ObservedTopKRouter

# --- Sparsemixer top-2 routing --------------------------------------------------------------------


class _SparseMixerWeight(torch.autograd.Function):
    """Forward: the chosen expert's gate times its Heun factor (1 or 0.3333). Backward: the gradient
    of the gate alone, `g · p_c · (onehot(c) − p)` w.r.t. the logits (the Heun factor is not
    differentiated; the threshold mask is constant). transformers' `PhimoeMultiplier`."""

    @staticmethod
    def forward(ctx, logits, gate, choice, gates, heun_factor):
        ctx.save_for_backward(gate, choice, gates)
        return gate * heun_factor

    @staticmethod
    def backward(ctx, grad_out):
        gate, choice, gates = ctx.saved_tensors
        grad = grad_out * gate
        grad_logits = gates * -grad
        grad_logits.scatter_add_(dim=-1, index=choice, src=grad)
        return grad_logits, None, None, None, None


def _beyond_threshold(logits: torch.Tensor, reference: torch.Tensor, jitter_eps: float):
    """True for experts whose logit is more than 2·eps (relative) below `reference`."""
    factor = logits.abs().clamp(min=reference)
    return ((reference - logits) / factor) > (2 * jitter_eps)


def _sparsemixer_pick(logits, candidates, threshold_ref, eval_choice, jitter_eps, training, rand2):
    """One sparsemixer step over `candidates` (logits with earlier picks set to -inf)."""
    with torch.no_grad():
        masked = _beyond_threshold(logits, threshold_ref, jitter_eps)
    gates = candidates.masked_fill(masked, float("-inf"))
    if not training:
        gates = torch.softmax(gates, dim=-1)
        return gates.gather(dim=-1, index=eval_choice), eval_choice
    with torch.no_grad():
        # Gumbel-max sampling from softmax(gates) (transformers' choice over torch.multinomial).
        noise = torch.empty_like(gates, memory_format=torch.legacy_contiguous_format)
        choice = (gates - noise.exponential_().log()).max(dim=-1)[1].unsqueeze(-1)
        gates = torch.softmax(gates, dim=-1)
        gate = gates.gather(dim=-1, index=choice)
        argmax = gates.max(dim=-1, keepdim=True)[1]
        coin = torch.rand_like(gate)
        if rand2:
            # transformers draws this uniform twice for the second expert
            # (`rand_like().uniform_()`); the same draws keep a seeded run identical to it.
            coin.uniform_()
        # Heun's third-order rule f(x) − f(0) ≈ ¼ f'(x) + ¾ f'(x/3): a sampled non-argmax expert
        # is weighted 0.3333 with probability 3/4, fully otherwise (0.3333 + 0.6667 is 1.0 exactly
        # in fp32).
        heun = torch.add(0.3333, (choice == argmax) | (coin > 0.75), alpha=0.6667).type_as(gates)
    return _SparseMixerWeight.apply(logits, gate, choice, gates, heun), choice


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float, training: bool):
    """Sparsemixer top-2 routing of `logits`.

    Identical in value (eval) and in random-number use (training) to transformers' `phimoe`
    `sparsemixer(scores, jitter_eps, training)`; see `SparseMixerRouter` for what it computes.

    Args:
        logits: [T, N] router logits.
        jitter_eps: the masking threshold (the config's `router_jitter_noise`).
        training: sample the experts (Gumbel-max, Heun factor) rather than take the argmax.

    Returns:
        (weights [T, 2], experts [T, 2] int64).
    """
    with torch.no_grad():
        top1_logit, top1 = logits.max(dim=-1, keepdim=True)
    w1, e1 = _sparsemixer_pick(logits, logits, top1_logit, top1, jitter_eps, training, False)
    # The second expert: the first one masked out, threshold relative to the best remaining.
    rest = torch.scatter(logits, -1, e1, float("-inf"))
    with torch.no_grad():
        top2_logit, top2 = rest.max(dim=-1, keepdim=True)
    w2, e2 = _sparsemixer_pick(logits, rest, top2_logit, top2, jitter_eps, training, True)
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


class SparseMixerRouter(ObservedTopKRouter):
    """PhiMoE's sparsemixer top-2 router (GRIN-MoE, arXiv 2409.12136) for Megatron-Core.

    Logits are Megatron's gating output (fp32 with `moe_router_dtype="fp32"`). With eps the
    config's `router_jitter_noise` (a threshold, not noise; Phi-3.5-MoE: 0.01):

    Eval (`self.training` False) — exactly transformers' `phimoe.sparsemixer(training=False)`:
      1. expert 1 = argmax of the logits; every expert with (max − l) / max(|l|, max) > 2·eps is
         masked to −inf; weight 1 = softmax over the unmasked logits, taken at expert 1;
      2. expert 1 is set to −inf; expert 2 = argmax of the rest; the same threshold relative to
         that second-best logit (factor max(|l|, l_2nd) over the original logits) masks the rest;
         weight 2 = softmax over what is left (expert 1 excluded), taken at expert 2.
      The weights are not renormalised; gradients (if any) are those of these expressions.

    Training — exactly transformers' `sparsemixer(training=True)`, random draws included:
      - each expert is *sampled* from its masked softmax by Gumbel-max instead of taken as argmax
        (expert 2 from the distribution with expert 1 removed);
      - its forward weight is its masked-softmax probability p_c times a Heun factor: 1 when the
        sample is the argmax or, with probability 1/4, otherwise; else 0.3333 (≈ 1/3; Heun's
        third-order estimate ¼ f'(x) + ¾ f'(x/3) of the routing gradient);
      - backward (custom autograd): the logits receive g · p_c · (onehot(c) − p) for each pick,
        i.e. the gradient of p_c alone — the Heun factor, the sampling and the threshold mask are
        treated as constants, and nothing flows through the second pick's masking of the first.
    Input jitter (`input_jitter_noise`) is not here: PhiMoE multiplies the whole MoE input (router
    and experts) by U(1−ε, 1+ε) noise in training, which `add_input_jitter` does.

    Returns Megatron's (probs [T, N] with the two weights at the chosen experts and 0 elsewhere,
    routing_map [T, N] bool). Megatron's load-balancing losses attach as in `TopKRouter` when
    `moe_aux_loss_coeff` > 0 (Phi's default is 0); like transformers' PhiMoE aux loss they count
    plain softmax top-2 assignments, not the sparsemixer's picks. Observers see the raw logits.

    Args:
        config: the model's `TransformerConfig` (top-k must be 2).
        pg_collection: megatron's process groups, passed on.
        jitter_eps: the masking threshold (`router_jitter_noise`).
        **router_kwargs: passed to megatron's `TopKRouter`.

    Raises:
        ValueError: top-k other than 2, or a megatron router option it does not support (named).
    """

    def __init__(self, config, pg_collection=None, *, jitter_eps: float = 0.01, **router_kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **router_kwargs)
        if self.topk != 2:
            raise ValueError(f"sparsemixer routing is top-2 only; moe_router_topk={self.topk}")
        unsupported = {
            "moe_router_enable_expert_bias": config.moe_router_enable_expert_bias,
            "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
            "moe_enable_routing_replay": config.moe_enable_routing_replay,
            "moe_router_force_load_balancing": config.moe_router_force_load_balancing,
            "moe_input_jitter_eps (add_input_jitter jitters the MoE input)": (
                config.moe_input_jitter_eps is not None
            ),
            f"moe_router_score_function={self.score_function!r}": self.score_function != "softmax",
            "moe_router_load_balancing_type='sinkhorn'": self.routing_type == "sinkhorn",
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"SparseMixerRouter does not support: {', '.join(bad)}")
        self.jitter_eps = float(jitter_eps)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route by the sparsemixer, attach the aux losses (training) and show the observers.

        Args:
            logits: [S, B, N] router logits (fp32).
            padding_mask: [S, B] bool, True = padding, or None.

        Returns:
            (probs [S·B, N] with the two weights at the chosen experts, routing_map [S·B, N]
            bool), as megatron's `TopKRouter.routing`.
        """
        seq_length, bsz = logits.shape[:2]
        flat = logits.view(-1, self.config.num_moe_experts)
        flat_padding = padding_mask.reshape(-1) if padding_mask is not None else None
        flat = self.apply_z_loss(flat, padding_mask=flat_padding)

        weights, experts = sparsemixer_top2(flat, self.jitter_eps, self.training)
        probs = torch.zeros_like(flat).scatter(1, experts, weights)
        routing_map = torch.zeros_like(flat, dtype=torch.bool).scatter(1, experts, True)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                flat, self.topk, self.score_function,
                fused=self.config.moe_router_fusion, padding_mask=flat_padding,
            )
            with_padding = flat_padding is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=with_padding)
            probs = self._apply_seq_aux_loss(
                probs, aux_scores, aux_map, seq_length, bsz, with_padding_mask=with_padding
            )
            probs = self._apply_global_aux_loss(
                probs, aux_scores, aux_map, with_padding_mask=with_padding
            )
        return self.observe_and_attach(logits, padding_mask, probs), routing_map


# --- PhiMoE's input jitter on the MoE layer ------------------------------------------------------


def _input_jitter_pre_hook(module, args, kwargs):
    """In training, multiply the MoE layer's input by U(1−ε, 1+ε) noise (ε = the layer's
    `input_jitter_noise`), so router and experts see the same jittered tokens — PhiMoE's
    `input_jitter_noise` as in Microsoft's PhiMoE code and transformers' MoE block.

    Megatron's own `moe_input_jitter_eps` jitters only the router input, and in eval too. A
    forward pre-hook (not a `MoELayer` subclass in the spec) because megatron's TransformerLayer
    hands its process groups only to an mlp module that *is* `MoELayer`. Under full-layer
    recompute megatron restores the RNG state, so the recomputed noise is the same.
    """
    eps = module.input_jitter_noise
    if not (module.training and eps > 0) or kwargs.get("intermediate_tensors") is not None:
        return None
    hidden_states, *rest = args
    noise = torch.empty_like(hidden_states).uniform_(1.0 - eps, 1.0 + eps)
    return (hidden_states * noise, *rest), kwargs


def add_input_jitter(moe_layer: MoELayer, input_jitter_noise: float) -> None:
    """Give `moe_layer` PhiMoE's training-time input jitter (see `_input_jitter_pre_hook`).

    Args:
        moe_layer: a megatron `MoELayer` (the hook is registered once; later calls set ε).
        input_jitter_noise: ε; the input is multiplied by U(1−ε, 1+ε) in training.
    """
    if getattr(moe_layer, "input_jitter_noise", None) is None:
        moe_layer.register_forward_pre_hook(_input_jitter_pre_hook, with_kwargs=True)
    moe_layer.input_jitter_noise = float(input_jitter_noise)


# --- Biases ---------------------------------------------------------------------------------------


class RowParallelLinearWithBias(RowParallelLinear):
    """`RowParallelLinear` that always has a bias (attention o_proj), whatever `bias` the caller
    derives from `add_bias_linear`. The bias is added once after the TP reduction (or returned
    for bias-dropout-add with `skip_bias_add`), and is marked sequence-parallel like Megatron's.

    Args:
        input_size, output_size: as `RowParallelLinear`.
        bias: ignored (always True).
        **kwargs: passed to `RowParallelLinear`.
    """

    def __init__(self, input_size, output_size, *, bias=True, **kwargs):
        super().__init__(input_size, output_size, bias=True, **kwargs)


@functools.lru_cache(maxsize=None)
def te_row_parallel_linear_with_bias():
    """The Transformer Engine twin of `RowParallelLinearWithBias` (needs TE)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE, TERowParallelLinear

    if not HAVE_TE:
        raise ImportError("the TE layer spec needs Transformer Engine, which is not installed")

    class TERowParallelLinearWithBias(TERowParallelLinear):
        """`TERowParallelLinear` that always has a bias (attention o_proj)."""

        def __init__(self, input_size, output_size, *, bias=True, **kwargs):
            super().__init__(input_size, output_size, bias=True, **kwargs)

    return TERowParallelLinearWithBias


def add_output_layer_bias(output_layer, config) -> None:
    """Give the vocab-parallel output layer (lm_head) a zero bias split over TP like its weight.

    `ColumnParallelLinear` adds `self.bias` in forward (skip_bias_add=False) and shards it on
    dim 0 in `sharded_state_dict`; this creates it exactly as `bias=True` would have.

    Args:
        output_layer: the model's `ColumnParallelLinear` output layer (left alone if it has a
            bias).
        config: the model's `TransformerConfig` (dtype and where to allocate).
    """
    if output_layer.bias is not None:
        return
    bias = torch.nn.Parameter(
        torch.zeros(
            output_layer.output_size_per_partition,
            dtype=config.params_dtype,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device(),
        )
    )
    set_tensor_model_parallel_attributes(bias, True, 0, 1)
    setattr(bias, "allreduce", True)
    output_layer.bias = bias


# --- Longrope -------------------------------------------------------------------------------------


def longrope_inv_freq(factors, head_dim: int, base: float, device=None) -> torch.Tensor:
    """Longrope inverse frequencies, as transformers' `_compute_longrope_parameters`.

    Args:
        factors: head_dim / 2 rescale factors (short or long).
        head_dim: d, the rotary dimension.
        base: the rotary base θ.
        device: where the result is made.

    Returns:
        [d / 2] float32: 1 / (factor_i · base^(2i/d)).
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    return 1.0 / (ext * base**exponent)


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """Megatron `RotaryEmbedding` with Phi-3 longrope inverse frequencies.

    The same call signature and caching as megatron's (`forward(max_seq_len, offset=0,
    packed_seq=False, cp_group=None)`, `get_rotary_seq_len`). The factors switch like
    transformers': positions up to `original_max_position_embeddings` use `short_factor`, and a
    forward whose last position + 1 (`offset + max_seq_len`, Megatron's rotary length — the full
    sequence under SP/CP) exceeds it uses `long_factor` for every position. (With an inference
    context megatron's rotary length is the context's maximum length, so the choice is made once
    for the whole generation rather than when the sequence crosses the switch as in HF.)

    The mscale is not in these angles: HF multiplies cos and sin by it, which is the same as
    scaling q·k by mscale² — done by the attention softmax scale (`attention_softmax_scale`).

    Args:
        kv_channels: the head dimension (the factor lists hold half as many entries).
        longrope: the factors, mscales and switch length.
        rotary_base: θ.
        rotary_interleaved, use_cpu_initialization, cp_group: as megatron's `RotaryEmbedding`.

    Raises:
        ValueError: factor lists of another length than kv_channels / 2.
    """

    def __init__(self, kv_channels: int, longrope: LongRopeScaling, rotary_base: float,
                 rotary_interleaved: bool = False, use_cpu_initialization: bool = False,
                 cp_group=None):
        super().__init__(
            kv_channels=kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=rotary_interleaved,
            rotary_base=rotary_base,
            use_cpu_initialization=use_cpu_initialization,
            cp_group=cp_group,
        )
        half = kv_channels // 2
        if len(longrope.short_factor) != half or len(longrope.long_factor) != half:
            raise ValueError(
                f"longrope needs head_dim/2 = {half} factors per list; got "
                f"{len(longrope.short_factor)} short and {len(longrope.long_factor)} long"
            )
        self.longrope = longrope
        device = self.inv_freq.device
        inv_freq = functools.partial(longrope_inv_freq, head_dim=kv_channels, base=rotary_base,
                                     device=device)
        self.short_inv_freq = inv_freq(longrope.short_factor)
        self.long_inv_freq = inv_freq(longrope.long_factor)
        self.inv_freq = self.short_inv_freq  # what megatron's cos/sin helpers read

    def uses_long_factors(self, seq_len: int) -> bool:
        """Whether a forward of `seq_len` positions is past the switch (long factors).

        Args:
            seq_len: the rotary length (last position + 1).
        """
        return seq_len > self.longrope.original_max_position_embeddings

    def mscale(self, seq_len: int) -> float:
        """The factor HF applies to cos and sin for a forward of `seq_len` positions.

        Args:
            seq_len: the rotary length.
        """
        lr = self.longrope
        return lr.long_mscale if self.uses_long_factors(seq_len) else lr.short_mscale

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """The rotary angles, with the factors `offset + max_seq_len` selects.

        Args:
            max_seq_len: positions to compute.
            offset: the first position.

        Returns:
            [max_seq_len, kv_channels / 2] float32 angles.
        """
        inv_freq = self.long_inv_freq if self.uses_long_factors(offset + max_seq_len) else (
            self.short_inv_freq
        )
        # megatron's get_emb moves `self.inv_freq` to the GPU on first use; follow it.
        inv_freq = inv_freq.to(self.inv_freq.device)
        seq = torch.arange(max_seq_len, device=inv_freq.device, dtype=inv_freq.dtype) + offset
        return torch.outer(seq, inv_freq)

    def get_rotary_seq_len(self, inference_context, *args, **kwargs) -> int:
        """megatron's rotary length, refused with an inference context when the mscales differ.

        Args:
            inference_context: megatron's inference context, or None.
            *args, **kwargs: as megatron's `RotaryEmbedding.get_rotary_seq_len`.

        Returns:
            The rotary length megatron computes.

        Raises:
            NotImplementedError: an inference context with short_mscale != long_mscale.
        """
        if _mscales_differ(self.longrope) and (
            inference_context is not None or kwargs.get("inference_params") is not None
        ):
            raise NotImplementedError(
                "longrope with short_mscale != long_mscale is not supported with an inference "
                "context (the attention scale follows the current key length there)"
            )
        return super().get_rotary_seq_len(inference_context, *args, **kwargs)


def _mscales_differ(longrope: Optional[LongRopeScaling]) -> bool:
    return longrope is not None and longrope.short_mscale != longrope.long_mscale


def attention_softmax_scale(arch: MoEArchitecture) -> Optional[float]:
    """Softmax scale that carries longrope's mscale: mscale² / sqrt(head_dim).

    HF computes softmax((m·R q)·(m·R k) / sqrt(d)) — cos and sin times m — which equals
    softmax(m² (R q)·(R k) / sqrt(d)): exact, free, and the same on every attention backend (local,
    TE, fused RoPE). When short and long mscales differ this is the short one, and
    `LongRopeMscaleAttention` rescales the query by (long/short)² for sequences beyond the switch.

    Args:
        arch: the model architecture.

    Returns:
        mscale² / sqrt(head_dim), or None without longrope (megatron's default 1/sqrt(d)).
    """
    if arch.longrope is None:
        return None
    return arch.longrope.short_mscale**2 / math.sqrt(arch.kv_channels)


class _LongRopeMscaleMixin:
    """Core attention whose scores get (long_mscale/short_mscale)² beyond the longrope switch.

    Only used when the two mscales differ (no released PhiMoE checkpoint does). The sequence
    length is read from the attention inputs — key length × CP size, or the packed maximum — the
    same length the rotary embedding switches on, so it stays right under activation recompute
    and variable-length micro-batches, and needs no state shared with the rotary module.
    """

    def _init_longrope(self, longrope: LongRopeScaling):
        self.longrope_switch = longrope.original_max_position_embeddings
        self.longrope_query_scale = (longrope.long_mscale / longrope.short_mscale) ** 2

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        packed = kwargs.get("packed_seq_params")
        if packed is not None:
            seq_len = max(packed.max_seqlen_q, packed.max_seqlen_kv)
        else:
            seq_len = key.shape[0] * self.config.context_parallel_size
        if seq_len > self.longrope_switch:
            query = query * self.longrope_query_scale
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class LongRopeMscaleAttention(_LongRopeMscaleMixin, ContextParallelDotProductAttention):
    """The local spec's core attention with the longrope query rescale past the switch.

    Args:
        *args, **kwargs: as `ContextParallelDotProductAttention`.
        longrope: the model's longrope settings (switch and mscales).
    """

    def __init__(self, *args, longrope: LongRopeScaling, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_longrope(longrope)


@functools.lru_cache(maxsize=None)
def te_longrope_mscale_attention():
    """The Transformer Engine twin of `LongRopeMscaleAttention` (needs TE)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention

    if not HAVE_TE:
        raise ImportError("the TE layer spec needs Transformer Engine, which is not installed")

    class TELongRopeMscaleAttention(_LongRopeMscaleMixin, TEDotProductAttention):
        def __init__(self, *args, longrope: LongRopeScaling, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_longrope(longrope)

    return TELongRopeMscaleAttention


# --- Builder entry points -------------------------------------------------------------------------


def _check_phimoe(arch: MoEArchitecture) -> None:
    if arch.family != "phimoe":
        raise ValueError(f"not a PhiMoE architecture: family={arch.family!r}")
    if arch.router == "sparsemixer" and arch.moe_router_topk != 2:
        raise ValueError(f"sparsemixer routing is top-2 only; got top-{arch.moe_router_topk}")


def phimoe_config_kwargs(arch: MoEArchitecture) -> dict:
    """Extra `TransformerConfig` arguments for PhiMoE (q/k/v bias is set by the builder).

    Args:
        arch: a PhiMoE architecture.

    Returns:
        {"moe_router_score_function": "softmax"}, with `softmax_scale` under longrope.

    Raises:
        ValueError: not a PhiMoE architecture, or sparsemixer with top-k other than 2.
    """
    _check_phimoe(arch)
    kwargs = {"moe_router_score_function": "softmax"}
    scale = attention_softmax_scale(arch)
    if scale is not None:
        kwargs["softmax_scale"] = scale
    return kwargs


def customize_phimoe_layer_spec(spec, arch: MoEArchitecture, use_te: bool):
    """Swap in the sparsemixer router, o_proj bias and (only when the longrope mscales differ)
    the mscale-switching core attention.

    Args:
        spec: the layer spec `models.builder.layer_spec` built (modified in place).
        arch: a PhiMoE architecture.
        use_te: whether the spec is Transformer Engine's (picks the TE twins).

    Returns:
        The same spec.

    Raises:
        ValueError: not a PhiMoE architecture, or sparsemixer with top-k other than 2.
    """
    _check_phimoe(arch)
    if arch.router == "sparsemixer":
        module_submodules(spec.submodules.mlp).router = functools.partial(
            SparseMixerRouter, jitter_eps=arch.router_jitter_noise
        )
    attn = spec.submodules.self_attention.submodules
    if arch.add_attn_output_bias:
        attn.linear_proj = (
            te_row_parallel_linear_with_bias() if use_te else RowParallelLinearWithBias
        )
    if _mscales_differ(arch.longrope):
        core = te_longrope_mscale_attention() if use_te else LongRopeMscaleAttention
        attn.core_attention = functools.partial(core, longrope=arch.longrope)
    return spec


def finish_phimoe_model(model, arch: MoEArchitecture, config) -> None:
    """Longrope rotary embedding, MoE input jitter and lm_head bias on a freshly built
    `GPTModel`.

    Args:
        model: the model chunk (modified in place).
        arch: a PhiMoE architecture.
        config: its `TransformerConfig`.

    Raises:
        ValueError: not a PhiMoE architecture, or sparsemixer with top-k other than 2.
    """
    _check_phimoe(arch)
    if arch.input_jitter_noise > 0:
        for module in model.modules():
            if isinstance(module, MoELayer):
                add_input_jitter(module, arch.input_jitter_noise)
    if arch.longrope is not None and getattr(model, "rotary_pos_emb", None) is not None:
        old = model.rotary_pos_emb
        model.rotary_pos_emb = LongRopeRotaryEmbedding(
            kv_channels=config.kv_channels,
            longrope=arch.longrope,
            rotary_base=arch.rotary_base,
            rotary_interleaved=config.rotary_interleaved,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=old.cp_group,
        )
        model.rotary_pos_emb_cache = {}
    if arch.add_lm_head_bias and getattr(model, "post_process", False):
        add_output_layer_bias(model.output_layer, config)


__all__ = [
    "LongRopeMscaleAttention",
    "LongRopeRotaryEmbedding",
    "add_input_jitter",
    "RowParallelLinearWithBias",
    "SparseMixerRouter",
    "add_output_layer_bias",
    "attention_softmax_scale",
    "customize_phimoe_layer_spec",
    "finish_phimoe_model",
    "longrope_inv_freq",
    "phimoe_config_kwargs",
    "sparsemixer_top2",
]
