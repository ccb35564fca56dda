"""Everything that differs between the machines and megatron-core versions this project runs on.

- `cpu`: megatron-core on machines without CUDA or Transformer Engine (CPU tensors, gloo).
- `megatron_versions`: the differences between the megatron-core versions in the supported range
  (docs/compatibility.md lists each one, what the project does about it and which test shows it).
"""

from sara_megatron.compat.cpu import (
    apply_cpu_compat,
    apply_no_transformer_engine_compat,
    fallbacks_in_use,
)

__all__ = ["apply_cpu_compat", "apply_no_transformer_engine_compat", "fallbacks_in_use"]
