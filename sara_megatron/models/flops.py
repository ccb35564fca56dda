"""Model FLOPs of a training step, for throughput figures (TFLOP/s per GPU).

Matmul FLOPs only (2 per multiply-add), the way MFU is usually counted: attention projections,
the causal attention core (each query attends to (S + 1) / 2 keys on average), the router, the
top-k routed experts (gated MLP: three matrices), and the output layer over the padded
vocabulary. A training step is three forwards' worth (forward, and a backward of twice the
forward), with no activation recompute.
Norms, softmaxes, the routing-JS loss and the all-to-alls are left out.
"""

from __future__ import annotations

from sara_megatron.models.architecture import MoEArchitecture


def forward_flops_per_token(arch: MoEArchitecture, seq_length: int) -> float:
    """Forward matmul FLOPs of one token in a causal sequence of `seq_length` tokens.

    Args:
        arch: the model architecture.
        seq_length: S, the sequence length (the attention core grows with it).

    Returns:
        FLOPs (2 per multiply-add), the output layer over the TP=1 padded vocabulary.
    """
    h = arch.hidden_size
    q_width = arch.num_attention_heads * arch.kv_channels
    kv_width = arch.num_query_groups * arch.kv_channels
    projections = 2 * h * (2 * q_width + 2 * kv_width)  # q, o; k, v
    core = 2 * 2 * q_width * (seq_length + 1) / 2  # QKᵀ and PV over the causal context
    router = 2 * h * arch.num_experts
    experts = arch.moe_router_topk * 3 * 2 * h * arch.moe_ffn_hidden_size
    per_layer = projections + core + router + experts
    output = 2 * h * arch.padded_vocab_size()  # the padded rows are computed too
    return arch.num_layers * per_layer + output


def training_flops_per_token(arch: MoEArchitecture, seq_length: int) -> float:
    """Forward + backward matmul FLOPs of one token (3 × forward).

    Args:
        arch: the model architecture.
        seq_length: S, the sequence length.

    Returns:
        FLOPs per token of a training step without activation recompute.
    """
    return 3 * forward_flops_per_token(arch, seq_length)
