"""Run megatron-core (0.16.1 through 0.19.x) on machines without CUDA (CPU tensors, gloo).

megatron-core assumes CUDA in a handful of places. Each patch below names the megatron-core
function it works around. `apply_cpu_compat()` does nothing when CUDA is available, so none of it
is ever active on a GPU machine. `apply_no_transformer_engine_compat()` is separate: megatron-core
0.16.1 also trips over a missing Transformer Engine on a GPU machine, so `initialize_distributed`
applies it wherever TE is absent.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):  # `torch.cuda.current_device()` returns an int on GPU machines
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceToCpu(TorchFunctionMode):
    """Maps `device="cuda"` / `device=<int>` arguments of torch factory calls and `.to()` to CPU.

    Also reports CPU tensors' `.type()` under CUDA names (see below). Works around literal CUDA
    allocations in megatron-core:
    `transformer.utils.get_default_causal_mask`, `pipeline_parallel.schedules` (loss and
    `num_tokens` buffers), `pipeline_parallel.p2p_communication._communicate` (receive buffers),
    `transformer.moe.router.TopKRouter.__init__` (expert-bias and aux-loss buffers),
    `RotaryEmbedding.get_emb` (`inv_freq.to(torch.cuda.current_device())`). Drops
    `pin_memory=True` (no pinned allocator without CUDA):
    `models.common.embeddings.rope_utils.get_pos_emb_on_this_cp_rank` (context parallel).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # `DistributedOptimizer._build_model_and_main_param_groups` and
            # `Float16OptimizerWithFloat16Params.__init__` accept parameters only when
            # `param.type()` names a CUDA tensor type ("torch.cuda.FloatTensor", ...).
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory") and func is not torch.Tensor.pin_memory:
            kwargs = dict(kwargs, pin_memory=False)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args:
            # Tensor.to(<int>|"cuda"[, ...]) and Tensor.cuda(): keep the tensor on the CPU, but
            # still honour a dtype given beside the device.
            if func is torch.Tensor.cuda:
                return args[0]
            rest = [a for a in args[1:] if not _is_cuda_device(a)]
            args = (args[0], *rest)
            if len(args) == 1 and not kwargs:
                return args[0]
        return func(*args, **kwargs)


class _CpuStream:
    """Stands in for `torch.cuda.current_stream()` on the CPU: every wait is already satisfied."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """`tensor_parallel.random.CudaRNGStatesTracker` over the CPU generator.

        Megatron forks the CUDA generator for model-parallel regions (dropout, TP weight init);
        on CPU the default generator plays that role, with the same named, seeded states.
        """

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


def apply_no_transformer_engine_compat() -> bool:
    """Patch megatron-core for machines without Transformer Engine (CPU, or a bare GPU image).

    Not a CPU patch: it is needed on GPU machines without TE as well. Idempotent.

    Returns:
        True if applied (Transformer Engine is missing), False when TE is installed.
    """
    import megatron.core.transformer.moe.moe_utils as mcore_moe_utils

    if getattr(mcore_moe_utils, "HAVE_TE", False):
        return False
    # `moe_utils.router_gating_linear` tests `te_general_gemm is not None`, a name that is only
    # bound when Transformer Engine imports (NameError otherwise).
    if not hasattr(mcore_moe_utils, "te_general_gemm"):
        mcore_moe_utils.te_general_gemm = None
    _patch_optimizer_step_state()
    return True


def _patch_optimizer_step_state() -> None:
    """Resuming megatron's distributed optimizer when it wraps torch's Adam (no apex / TE).

    `DistributedOptimizer._set_main_param_and_optimizer_states` copies every per-parameter
    state entry from the loaded checkpoint, but without apex/TE the optimizer is torch's Adam,
    whose per-parameter "step" the "fully_reshardable" format does not store (megatron restores
    it from the param groups in `load_state_dict`): loading raised KeyError('step')."""
    from megatron.core.optimizer import distrib_optimizer as mdo

    if getattr(mdo, "HAVE_APEX_OR_TE", True) or getattr(mdo, "_sara_step_patch", False):
        return
    original = mdo.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            tensors = dict(tensors, step=state["step"])  # already restored by load_state_dict
        return original(self, model_param, tensors)

    mdo.DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # `DistributedOptimizer.load_state_dict` gives every parameter's state the same "step" tensor;
    # torch's Adam increments it in place once per parameter, so after a resume the bias
    # correction ran ahead by the group's parameter count every step. One tensor per parameter.
    original_load = mdo.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    mdo.DistributedOptimizer.load_state_dict = load_state_dict
    mdo._sara_step_patch = True


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU execution when CUDA is unavailable. Idempotent.

    Returns:
        True if applied (now or by an earlier call), False when CUDA is available.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    apply_no_transformer_engine_compat()

    import megatron.core.tensor_parallel.random as mcore_random

    # torch.cuda.current_device() raises on a CPU build; megatron calls it in
    # `Router.gating` (moves the router weight "to the GPU"), `RotaryEmbedding.get_emb` and
    # `MegatronModule`/schedule helpers. The device it returns is mapped to CPU by the mode below.
    torch.cuda.current_device = lambda: "cpu"
    # `pipeline_parallel.schedules` and the checkpoint code synchronise the device around timers.
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron-core 0.19's `param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync` makes
    # the current stream wait for CUDA-graph events before reducing gradients; on the CPU work is
    # ordered already and there is no stream.
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM

    # `tensor_parallel.random.model_parallel_cuda_manual_seed` / `get_cuda_rng_tracker`: the
    # tracker snapshots CUDA generator states.
    mcore_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    _CudaDeviceToCpu().__enter__()  # stays on the mode stack for the life of the process
    _APPLIED = True
    return True


def fallbacks_in_use() -> list[str]:
    """The optional accelerated pieces this process runs without, in words for the start-up log."""
    import importlib.util

    fallbacks = []
    if importlib.util.find_spec("transformer_engine") is None:
        fallbacks.append("no Transformer Engine (local layers)")
    if importlib.util.find_spec("apex") is None:
        fallbacks.append("no Apex (torch optimizers)")
    if _APPLIED:
        fallbacks.append("CPU compatibility layer")
    return fallbacks

