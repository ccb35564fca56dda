"""Norm for the local (non-Transformer-Engine) layer spec.

megatron-core's local spec picks apex's FusedLayerNorm, or `WrappedTorchNorm`, which refuses
sequence parallel. With sequence parallel the norm weights see only this rank's tokens, so their
gradients must be summed over the TP group: megatron's `finalize_model_grads` does that for every
parameter marked `sequence_parallel = True`, which is what this module does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm (weight + bias) or RMSNorm (weight) in the input dtype, SP-aware parameters.

    Args:
        config: the model's `TransformerConfig` (normalization, params_dtype, CPU
            initialisation, sequence_parallel).
        hidden_size: the normalised width.
        eps: added to the variance.

    Raises:
        ValueError: a normalization other than LayerNorm or RMSNorm.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.normalization = config.normalization
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"unsupported normalization {self.normalization!r}")
        self.hidden_size = hidden_size
        self.eps = eps
        # Where megatron's own modules allocate: the CPU for CPU initialisation, else the GPU.
        factory = dict(
            dtype=config.params_dtype,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device(),
        )
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, **factory))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, **factory))
            if self.normalization == "LayerNorm"
            else None
        )
        for p in self.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension (RMSNorm in fp32, cast back before the weight).

        Args:
            x: [..., hidden_size], e.g. [S_local, B, H].

        Returns:
            The normalised tensor, same shape.
        """
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        # RMSNorm in fp32 like HF's Qwen3RMSNorm, cast back after the weight multiply.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
