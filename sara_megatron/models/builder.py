"""Build a Megatron-Core `GPTModel` for a `MoEArchitecture` on the current parallel state.

Transformer Engine layer spec when TE and CUDA are there; the local spec otherwise (CPU tests),
with our routers (dense-routing observers; Phi's sparsemixer) and sequence-parallel-aware norms.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from sara_megatron.compat.megatron_versions import module_submodules
from sara_megatron.models.architecture import MoEArchitecture
from sara_megatron.models.context_parallel import ContextParallelDotProductAttention
from sara_megatron.models.norms import SequenceParallelNorm
from sara_megatron.models.router import ObservedTopKRouter


def transformer_engine_available() -> bool:
    """Whether CUDA is available and Transformer Engine is installed."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Run-time choices that are not part of the architecture."""

    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    use_te: Optional[bool] = None  # None: TE when available
    # None: alltoall on GPU; allgather on CPU (megatron's alltoall dispatcher needs CUDA streams).
    token_dispatcher: Optional[str] = None
    moe_aux_loss_coeff: Optional[float] = None  # None: the architecture's default
    recompute: bool = False
    seq_length: Optional[int] = None
    # Training sums the loss over tokens and divides by the global token count once
    # (megatron's per-token loss): the update is then the same however the batch is split.
    calculate_per_token_loss: bool = False
    # False when every weight is about to be overwritten (checkpoint import, verify): megatron's
    # CPU initialisation builds each whole weight in fp32 before keeping this rank's part.
    perform_initialization: bool = True


def transformer_config(arch: MoEArchitecture, options: ModelOptions = ModelOptions()):
    """The Megatron `TransformerConfig` for `arch` on the current parallel state.

    Reads megatron's global parallel state (TP, PP, EP, CP, VPP); sequence parallel is on
    whenever TP > 1.

    Args:
        arch: the model architecture.
        options: run-time choices (dtype, TE, dispatcher, aux-loss coefficient, recompute, ...).

    Raises:
        InputError: a parallel size that does not divide the model.
        RuntimeError: `use_te=True` without Transformer Engine and CUDA.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    arch.validate_parallel(tp=tp, ep=ep, pp=pp, vpp=vpp)
    on_gpu = torch.cuda.is_available()
    use_te = transformer_engine_available() if options.use_te is None else options.use_te
    if use_te and not transformer_engine_available():
        raise RuntimeError("use_te=True but Transformer Engine with CUDA is not available")
    dispatcher = options.token_dispatcher or ("alltoall" if on_gpu else "allgather")
    aux = arch.router_aux_loss_coef if options.moe_aux_loss_coeff is None else options.moe_aux_loss_coeff
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.moe_ffn_hidden_size,
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        # HF softmax -> top-k -> renormalise (norm_topk_prob) is Megatron's top-k -> softmax.
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=aux,
        # Router logits in fp32: SARA's dense softmax and the JS loss read them.
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=use_te,
        moe_permute_fusion=False,
        normalization=arch.norm,
        layernorm_epsilon=arch.norm_epsilon,
        qk_layernorm=arch.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # The interleaved schedule with unbatched, overlapped p2p (what Megatron-LM sets for
        # it): at PP=2 both neighbours are the same rank, and batched ops on one communicator
        # pair activations with gradients (docs/distributed.md); the unbatched path sends one
        # direction over a second communicator when PP=2.
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
        expert_model_parallel_size=ep,
        context_parallel_size=cp,
        sequence_parallel=tp > 1,
        params_dtype=options.params_dtype,
        bf16=options.bf16,
        pipeline_dtype=options.params_dtype,
        use_cpu_initialization=not on_gpu,
        # The fused kernels are CUDA-only; on GPU megatron picks them itself.
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=on_gpu and use_te,
        # megatron's fused masked softmax is a separately built extension (apex / NGC container);
        # asking for it without the extension fails at the first attention call.
        masked_softmax_fusion=on_gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        gradient_accumulation_fusion=False,
        variable_seq_lengths=False,
        recompute_granularity="selective" if options.recompute else None,
        calculate_per_token_loss=options.calculate_per_token_loss,
        perform_initialization=options.perform_initialization,
    )
    if arch.family == "phimoe":
        from sara_megatron.models.phimoe import phimoe_config_kwargs

        kwargs.update(phimoe_config_kwargs(arch))
    return TransformerConfig(**kwargs)


def block_spec(arch: MoEArchitecture, config, use_te: bool, vp_stage: Optional[int] = None):
    """This stage's transformer block: megatron's layer spec with our routers and norms.

    Args:
        arch: the model architecture.
        config: its `TransformerConfig` (`transformer_config`).
        use_te: Transformer Engine's layer spec, else the local one.
        vp_stage: the virtual pipeline stage this block is for, or None.

    Returns:
        megatron's `TransformerBlockSubmodules`: this stage's layers and the final norm.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    spec = layer_spec(arch, config, use_te)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SequenceParallelNorm  # megatron's default final norm refuses SP on CPU
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=final_norm,
    )


def layer_spec(arch: MoEArchitecture, config, use_te: bool):
    """The transformer layer spec: megatron's, with our routers and norms swapped in.

    Args:
        arch: the model architecture (PhiMoE gets its own router, biases and attention).
        config: its `TransformerConfig`.
        use_te: Transformer Engine's spec, else the local one (with sequence-parallel norms and
            the context-parallel attention).

    Returns:
        megatron's `ModuleSpec` of one transformer layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=True, qk_layernorm=arch.qk_layernorm
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=arch.num_experts, qk_layernorm=arch.qk_layernorm, normalization=arch.norm
        )
        sub = spec.submodules
        sub.input_layernorm = SequenceParallelNorm
        sub.pre_mlp_layernorm = SequenceParallelNorm
        attn = sub.self_attention.submodules
        # megatron's local attention refuses context parallel; this one all-gathers K/V.
        attn.core_attention = ContextParallelDotProductAttention
        if arch.qk_layernorm:
            attn.q_layernorm = SequenceParallelNorm
            attn.k_layernorm = SequenceParallelNorm
    module_submodules(spec.submodules.mlp).router = ObservedTopKRouter
    if arch.family == "phimoe":
        from sara_megatron.models.phimoe import customize_phimoe_layer_spec

        spec = customize_phimoe_layer_spec(spec, arch, use_te)
    return spec


def build_model(
    arch: MoEArchitecture,
    options: ModelOptions = ModelOptions(),
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
):
    """A `GPTModel` (this rank's pipeline stage, TP/EP shards) for `arch`.

    Args:
        arch: the model architecture (recorded as `model.sara_architecture`).
        options: run-time choices (`ModelOptions`).
        pre_process: whether this chunk holds the embedding; None: megatron's first stage.
        post_process: whether it holds the final norm and output layer; None: the last stage.
        vp_stage: the virtual pipeline stage, or None.

    Returns:
        The model chunk, with the padded vocabulary masked out of the logits.

    Raises:
        InputError: a parallel size that does not divide the model.
        RuntimeError: `use_te=True` without Transformer Engine and CUDA.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, options)
    use_te = transformer_engine_available() if options.use_te is None else options.use_te
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(arch, config, use_te, vp_stage),
        vocab_size=arch.padded_vocab_size(ps.get_tensor_model_parallel_world_size()),
        max_sequence_length=options.seq_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        rotary_percent=1.0,
        vp_stage=vp_stage,
    )
    if arch.family == "phimoe":
        from sara_megatron.models.phimoe import finish_phimoe_model

        finish_phimoe_model(model, arch, config)
    if post_process:
        mask_padded_vocab(model, arch)
    model.sara_architecture = arch
    return model


# A logit this low has probability exactly 0 after softmax in fp32 and bf16.
PADDED_VOCAB_LOGIT = -1.0e4


def mask_padded_vocab(model, arch: MoEArchitecture) -> None:
    """Keep the vocabulary padding out of the softmax: its logits are pushed to -1e4.

    Megatron pads the vocabulary for its vocab-parallel layers (Phi: 32064 -> 32128); without this
    the padded columns (logit 0 with zero rows) would take probability mass in the cross-entropy,
    so the loss would not be the HF model's. Applied to this rank's slice of the output layer.

    Args:
        model: a `GPTModel` chunk holding the output layer.
        arch: its architecture (the unpadded `vocab_size`).
    """
    from megatron.core import parallel_state as ps

    padded = model.output_layer.output_size_per_partition * ps.get_tensor_model_parallel_world_size()
    if padded <= arch.vocab_size:
        return
    start = ps.get_tensor_model_parallel_rank() * model.output_layer.output_size_per_partition
    columns = torch.arange(start, start + model.output_layer.output_size_per_partition)
    offset = torch.where(columns >= arch.vocab_size, PADDED_VOCAB_LOGIT, 0.0)
    model.output_layer.register_buffer("padded_vocab_offset", offset, persistent=False)

    def add_offset(module, args, output):
        logits, bias = output
        return logits + module.padded_vocab_offset.to(device=logits.device, dtype=logits.dtype), bias

    model.output_layer.register_forward_hook(add_offset)


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """A causal attention mask, explicit because megatron's default one is allocated on "cuda".

    Args:
        seq_length: S, the (local) sequence length.
        device: where the mask is made.

    Returns:
        [1, 1, S, S] bool, True = masked out (megatron's convention).
    """
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)
