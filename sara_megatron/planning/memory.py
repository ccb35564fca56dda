"""Memory per GPU of a training layout: weights, gradients, optimizer state and activations.

All figures are estimates from the formulas below, not measurements. Bytes per parameter, as
the project's trainer sets megatron up (`training/state.py`: bf16 weights, fp32 gradient
buffers, megatron's mixed-precision Adam with fp32 main weights):

    weights 2 (bf16) + gradients 4 (fp32, `grad_reduce_in_fp32`)
    + optimizer 12 (fp32 main weight, Adam m and v)

The distributed optimizer shards the 12 optimizer bytes over the data-parallel group (dense
parameters: DP = world / (TP·PP); expert parameters: expert DP = DP / EP, since the expert
tensor-parallel size is TP); without it every rank keeps them all. This is Megatron-LM's own
accounting (18 bytes, or 6 + 12/DP with the distributed optimizer).

LoRA (`planning.lora`): only the trained parameters (the adapters, and the router when trained
fully) have gradients and optimizer state; megatron's DDP gives a gradient buffer, and its
optimizer a main weight and moments, only to parameters that require gradients. With P the
parameters a rank holds (frozen base and adapters) and T ⊂ P the trained ones:

    weights 2·P (bf16)   gradients 4·T   optimizer 12·T, or 12·(T_dense/DP + T_expert/(DP/EP))

Per-expert adapters are expert parameters; shared expert adapters are dense ones.

Activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(2022), redone for these layers (GQA attention with a separate head width, gated experts, top-k
routing). Bytes kept for backward per token of a micro-batch in one layer, bf16 (2 bytes) unless
noted, t = TP with sequence parallel (megatron turns SP on whenever TP > 1), q = heads·kv_channels,
kv = query_groups·kv_channels, k = top-k, F = expert FFN width, N = experts, a = heads, s = length:

    attention  2h/t  input norm input          2h/t  QKV input (norm output, kept SP-sharded)
               2(q+kv)/t  q/k norm inputs (qk-norm only)
               2(q+2kv)/t  Q, K, V into the core attention
               4a/t  softmax statistics (fp32, flash attention)   2q/t  output projection input
               [unfused attention instead: softmax output 2·a·s/t bytes — the s² term]
    MoE        2h/t  pre-MLP norm input        2h/t  router / dispatcher input
               8N/t  router logits and probabilities (fp32)
               2kh   the k routed copies of each token at its experts' ranks (the expert
                     tensor-parallel all-gather makes them full width: not divided by t)
               4kF/t fc1 output (gate; up)     2kF/t  fc2 input (SwiGLU output)
               2kh/t fc2 output weighted by the routing probabilities
    LoRA       2r·n  the adapters' A x outputs, kept for B's gradient: n adapted linears a
                     token passes in a layer (1 per adapted attention linear and router LoRA,
                     k per adapted expert linear); not divided by t (A's output is whole on
                     every TP rank). The adapters' inputs are the base layers' inputs, already
                     counted.
    dropout is 0 in these models (and LoRA dropout is taken as 0): no masks are kept.

Routing is taken as balanced (each rank receives on average k copies of each of its tokens'
worth); an unbalanced step raises the MoE terms on the busiest rank. Recompute: "selective"
(megatron's core-attention recompute, the trainer's `model.recompute`) drops the s² term, which
flash attention does not have anyway; "full" keeps only each layer's input (2h/t) plus one
layer's activations while it is recomputed. The last stage also holds, for its one micro-batch,
the final norm input (2h/t), bf16 logits (2V/t) and the fp32 softmax of megatron's
vocab-parallel cross entropy (4V/t), V the padded vocabulary.

Pipeline (1F1B): stage i holds the activations of min(PP − i, M) micro-batches at once, M the
micro-batches of one step per data-parallel rank. A layout fits when every stage's total plus a
reserve (CUDA context, NCCL buffers, allocator fragmentation, all-to-all temporaries: an assumed
margin, not a measurement) is at most the GPU's memory.
"""

from __future__ import annotations

import dataclasses

from sara_megatron.models.architecture import MoEArchitecture
from sara_megatron.planning.lora import LoraSpec, adapted_linears_per_token
from sara_megatron.planning.parameters import ParameterInfo, stage_parameters

GB = 1e9  # decimal gigabytes, as GPU memory is sold (an "80 GB" H100 holds 79.6e9 usable bytes)
RECOMPUTE_MODES = ("none", "selective", "full")
ATTENTION_KINDS = ("flash", "unfused")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout of `world` GPUs: world = TP · PP · DP, EP divides DP (CP = 1).

    Args:
        tp: Tensor-parallel size (also the expert tensor-parallel size).
        pp: Pipeline-parallel size.
        ep: Expert-parallel size, a divisor of `dp`.
        dp: Data-parallel size.
    """

    tp: int
    pp: int
    ep: int
    dp: int

    @property
    def world(self) -> int:
        """The number of GPUs, TP · PP · DP."""
        return self.tp * self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        """The expert data-parallel size, DP / EP."""
        return self.dp // self.ep

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} EP={self.ep} DP={self.dp}"


@dataclasses.dataclass(frozen=True)
class TrainingShape:
    """What besides the layout sets the memory: batch shape and the memory-relevant options.

    Attributes:
        seq_length: tokens per sequence.
        micro_batch_size: sequences per micro-batch.
        global_batch_size: sequences per optimizer step (sets the micro-batches in flight).
        distributed_optimizer: optimizer state sharded over data parallel (the trainer's default).
        recompute: "none", "selective" (the trainer's `model.recompute: true`) or "full".
        attention: "flash" (Transformer Engine on GPU) or "unfused" (megatron's local spec).
        reserve_gb: memory per GPU set aside for everything the formulas leave out (assumed).
    """

    seq_length: int = 2048
    micro_batch_size: int = 1
    global_batch_size: int = 256
    distributed_optimizer: bool = True
    recompute: str = "none"
    attention: str = "flash"
    reserve_gb: float = 6.0

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reserve_gb < 0:
            raise ValueError(f"reserve_gb must be >= 0, got {self.reserve_gb}")


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Estimated bytes on one GPU of a pipeline stage (`trainable_params` of the
    `dense_params + expert_params` it holds get gradients and optimizer state)."""

    stage: int
    dense_params: int
    expert_params: int
    trainable_params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    micro_batches_in_flight: int

    @property
    def total(self) -> float:
        """The stage's estimated bytes per GPU: weights + gradients + optimizer + activations."""
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclasses.dataclass(frozen=True)
class LayoutPlan:
    """A layout, its busiest stage's memory, and whether it fits."""

    layout: Layout
    stages: list[StageMemory]
    gpu_memory_gb: float
    reserve_gb: float

    @property
    def peak(self) -> StageMemory:
        """The busiest stage (the largest `total`)."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        """Whether the busiest stage plus the reserve fits in one GPU's memory."""
        return self.peak.total + self.reserve_gb * GB <= self.gpu_memory_gb * GB


def layer_activation_bytes_per_token(arch: MoEArchitecture, tp: int, seq_length: int,
                                     attention: str = "flash", recompute: str = "none",
                                     lora: LoraSpec | None = None) -> float:
    """Bytes one layer keeps for backward per token of a micro-batch (the module's formula).

    Args:
        arch: The model architecture.
        tp: Tensor-parallel size (sequence parallel on when > 1).
        seq_length: Tokens per sequence (for unfused attention's s² term).
        attention: "flash" or "unfused".
        recompute: "none", "selective" or "full" (selective and full drop the s² term).
        lora: The LoRA configuration, whose adapters' outputs are added; None for full
            fine-tuning.

    Returns:
        Bytes per token, on one GPU.
    """
    h, t, k = arch.hidden_size, tp, arch.moe_router_topk
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    f, n, a = arch.moe_ffn_hidden_size, arch.num_experts, arch.num_attention_heads
    attn = 2 * h / t + 2 * h / t + 2 * (q + 2 * kv) / t + 4 * a / t + 2 * q / t
    if arch.qk_layernorm:
        attn += 2 * (q + kv) / t
    if attention == "unfused" and recompute == "none":
        attn += 2 * a * seq_length / t
    moe = 2 * h / t + 2 * h / t + 8 * n / t + 2 * k * h + 4 * k * f / t + 2 * k * f / t + 2 * k * h / t
    adapters = 0.0 if lora is None else 2 * lora.rank * adapted_linears_per_token(arch, lora)
    return attn + moe + adapters


def activation_bytes(arch: MoEArchitecture, layout: Layout, shape: TrainingShape,
                     stage: int, lora: LoraSpec | None = None) -> tuple[float, int]:
    """Activation bytes on a GPU of pipeline `stage`, and the micro-batches it holds at once.

    Args:
        arch: The model architecture.
        layout: The TP/PP/EP/DP layout.
        shape: Batch shape and memory options.
        stage: The pipeline stage, 0 to PP − 1 (the last adds the logits and cross entropy).
        lora: The LoRA configuration, or None for full fine-tuning.

    Returns:
        `(bytes, micro_batches_in_flight)` under 1F1B.
    """
    t, pp = layout.tp, layout.pp
    tokens = shape.seq_length * shape.micro_batch_size
    layers = arch.num_layers // pp
    steps = max(1, shape.global_batch_size // (shape.micro_batch_size * layout.dp))
    in_flight = min(pp - stage, steps)
    full = layer_activation_bytes_per_token(arch, t, shape.seq_length, shape.attention,
                                            shape.recompute, lora)
    if shape.recompute == "full":
        per_micro = layers * 2 * arch.hidden_size / t
        working = full  # one layer recomputed at a time
    else:
        per_micro, working = layers * full, 0.0
    total = tokens * (in_flight * per_micro + working)
    if stage == pp - 1:
        vocab = arch.padded_vocab_size(t)
        total += tokens * (2 * arch.hidden_size / t + (2 + 4) * vocab / t)
    return total, in_flight


def plan_layout(table: list[ParameterInfo], arch: MoEArchitecture, layout: Layout,
                shape: TrainingShape, gpu_memory_gb: float,
                lora: LoraSpec | None = None) -> LayoutPlan:
    """Memory of every pipeline stage of `layout` and whether the busiest fits.

    Args:
        table: `parameters.parameter_table` of the whole model, or for LoRA
            `lora.lora_parameter_table` of it (which marks what is trained).
        arch: its architecture.
        layout: the TP/PP/EP/DP layout.
        shape: batch shape and options.
        gpu_memory_gb: memory of one GPU in GB (1e9 bytes).
        lora: the LoRA configuration the table was made with (adds its adapters' activations),
            or None for full fine-tuning.

    Returns:
        The `LayoutPlan`.
    """
    stages = []
    for counts in stage_parameters(table, arch, tp=layout.tp, ep=layout.ep, pp=layout.pp):
        if shape.distributed_optimizer:
            optimizer = 12 * (counts.trainable_dense / layout.dp
                              + counts.trainable_expert / layout.expert_dp)
        else:
            optimizer = 12 * counts.trainable
        acts, in_flight = activation_bytes(arch, layout, shape, counts.stage, lora)
        stages.append(StageMemory(
            stage=counts.stage, dense_params=counts.dense, expert_params=counts.expert,
            trainable_params=counts.trainable, weights=2 * counts.total,
            gradients=4 * counts.trainable, optimizer=optimizer, activations=acts,
            micro_batches_in_flight=in_flight,
        ))
    return LayoutPlan(layout, stages, gpu_memory_gb, shape.reserve_gb)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(arch: MoEArchitecture, gpus: int) -> list[Layout]:
    """Every TP/PP/EP/DP layout of `gpus` GPUs the model allows (CP = 1).

    TP divides the heads and query groups, PP the layers, EP the experts and the data-parallel
    size (the expert tensor-parallel size is TP, so expert DP = DP / EP).

    Args:
        arch: The model architecture.
        gpus: The number of GPUs.

    Returns:
        The layouts, in (TP, PP, EP) order.

    Raises:
        ValueError: `gpus` < 1.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    layouts = []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for ep in _divisors(dp):
                try:
                    arch.validate_parallel(tp=tp, ep=ep, pp=pp)
                except ValueError:
                    continue
                layouts.append(Layout(tp=tp, pp=pp, ep=ep, dp=dp))
    return layouts


def plan_layouts(table: list[ParameterInfo], arch: MoEArchitecture, gpus: int,
                 gpu_memory_gb: float, shape: TrainingShape,
                 lora: LoraSpec | None = None) -> list[LayoutPlan]:
    """`plan_layout` for every candidate layout of `gpus` GPUs, in (TP, PP, EP) order.

    Args:
        table: The parameter table (`plan_layout`'s).
        arch: The model architecture.
        gpus: The number of GPUs.
        gpu_memory_gb: Memory of one GPU in GB (1e9 bytes).
        shape: Batch shape and memory options.
        lora: The LoRA configuration the table was made with, or None.

    Returns:
        One `LayoutPlan` per candidate layout.

    Raises:
        ValueError: `gpu_memory_gb` is not positive, or `gpus` < 1.
    """
    if gpu_memory_gb <= 0:
        raise ValueError(f"gpu memory must be > 0 GB, got {gpu_memory_gb}")
    return [plan_layout(table, arch, layout, shape, gpu_memory_gb, lora)
            for layout in candidate_layouts(arch, gpus)]


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plans(plans: list[LayoutPlan], arch_name: str, gpus: int, shape: TrainingShape,
                 total_params: int, lora: LoraSpec | None = None,
                 trainable_params: int | None = None) -> str:
    """The planner's table: one row per layout, the busiest stage's memory in GB.

    With `lora`, a line names the configuration and its trained parameters
    (`trainable_params`, whole model), and a column gives the trained parameters per GPU.

    Args:
        plans: The plans to list (`plan_layouts`).
        arch_name: The model's name in the header line.
        gpus: The number of GPUs, for the header.
        shape: Batch shape and options, for the header.
        total_params: The whole model's parameters, for the header.
        lora: The LoRA configuration, or None for full fine-tuning.
        trainable_params: The whole model's trained parameters under `lora`.
    """
    first = plans[0] if plans else None
    lines = [
        f"{arch_name}: {_count(total_params)} parameters; {gpus} GPUs of "
        f"{first.gpu_memory_gb if first else 0:g} GB; seq {shape.seq_length} × micro-batch "
        f"{shape.micro_batch_size}, global batch {shape.global_batch_size}; "
        f"{'distributed' if shape.distributed_optimizer else 'replicated'} optimizer; "
        f"recompute {shape.recompute}; {shape.attention} attention; reserve {shape.reserve_gb:g} GB",
    ]
    if lora is not None:
        lines.append(f"{lora.describe()}: {_count(trainable_params or 0)} trained parameters "
                     f"({trainable_params or 0:,}), the rest frozen (bf16, no gradient or "
                     "optimizer state)")
    lines += [
        "ESTIMATES from the formulas in sara_megatron/planning/memory.py (GB = 1e9 bytes), "
        "busiest pipeline stage:",
        f"{'layout':<24}{'params/GPU':>12}" + (f"{'trained/GPU':>12}" if lora else "")
        + f"{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'total':>8}  fits",
    ]
    for plan in plans:
        peak = plan.peak
        lines.append(
            f"{str(plan.layout):<24}{_count(peak.dense_params + peak.expert_params):>12}"
            + (f"{_count(peak.trainable_params):>12}" if lora else "")
            + f"{peak.weights / GB:>9.1f}{peak.gradients / GB:>8.1f}{peak.optimizer / GB:>8.1f}"
            f"{peak.activations / GB:>8.1f}{peak.total / GB:>8.1f}  "
            f"{'yes' if plan.fits else 'no'}"
        )
    fitting = sum(p.fits for p in plans)
    lines.append(f"{fitting} of {len(plans)} layouts fit.")
    return "\n".join(lines)
