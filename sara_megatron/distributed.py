"""Distributed start-up and teardown: torchrun / SLURM environment, backend, Megatron parallel state.

One entry point, `initialize_distributed(ParallelConfig(...))`, serves a single process (world
size 1, no launcher), `torchrun` and `srun`. NCCL when CUDA is there, gloo otherwise (then the CPU
compatibility layer is applied first).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import random
import re
import socket

import numpy as np
import torch
import torch.distributed as dist

from sara_megatron.compat import (
    apply_cpu_compat,
    apply_no_transformer_engine_compat,
    fallbacks_in_use,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout (the training config's `parallel` section).

    Data parallel is whatever the world size leaves.

    Attributes:
        tp: Tensor-parallel size (sequence parallel is turned on with it whenever tp > 1).
        pp: Pipeline-parallel size.
        ep: Expert-parallel size.
        cp: Context-parallel size.
        vpp: Virtual pipeline stages per rank (interleaved schedule), or None for plain 1F1B.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    # Virtual pipeline stages per rank (interleaved schedule); None = plain 1F1B.
    vpp: int | None = None
    # Sequence parallel is not a setting: megatron-core refuses MoE + TP training without it, so
    # the model builder turns it on whenever tp > 1.

    def validate_world(self, world_size: int) -> int:
        """Check the layout against the world size.

        Args:
            world_size: The number of processes.

        Returns:
            The data-parallel size, world_size / (tp·pp·cp).

        Raises:
            ValueError: A size below 1, a world size that tp·pp·cp does not divide, or an EP
                that does not divide DP·CP.
        """
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}"
            )
        dp = world_size // model_parallel
        # Expert tensor parallel defaults to TP in megatron-core, so the expert grid is
        # etp*ep*pp ranks and EP must divide what attention uses for data and context parallel.
        if (dp * self.cp) % self.ep:
            raise ValueError(
                f"expert parallel size {self.ep} must divide data_parallel*context_parallel = "
                f"{dp}*{self.cp} (world {world_size}, tp {self.tp}, pp {self.pp})"
            )
        return dp


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands in its launch, as the launcher's environment says.

    Attributes:
        rank: The global rank.
        local_rank: The rank on this node (picks the GPU).
        world_size: The number of processes.
        master_addr: The rendezvous host.
        master_port: The rendezvous port.
    """
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous or a launcher's --master-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm host list, without a subprocess (`scontrol show hostnames` is the
    canonical expander): "rack1-node[01-02]-ib,gpu7" -> "rack1-node01-ib", "a[1-2]b[3-4]" ->
    "a1b3", "node[01-03,07]" -> "node01". Commas inside brackets separate ranges, not hosts."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    # Each bracket stands for its first range's first value, zero padding kept.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split("[,-]", m.group(1))[0], nodelist[:end])


def _slurm_master_addr() -> str:
    # Rank 0 runs on the first node of the step (srun -N can use part of the allocation).
    nodelist = (
        os.environ.get("SLURM_STEP_NODELIST")
        or os.environ.get("SLURM_JOB_NODELIST")
        or os.environ.get("SLURM_NODELIST", "")
    )
    return _first_host(nodelist) if nodelist else "127.0.0.1"


def _started_by_srun(env) -> bool:
    """True only in a task srun started. A batch script itself (sbatch's batch step) also has
    SLURM_PROCID=0 and SLURM_NTASKS=N, but it is one process: treating it as rank 0 of N would
    wait forever for the others. srun sets the step variables (SLURM_STEP_ID,
    SLURM_STEP_NUM_TASKS, ...) in each task; the batch step has none of them (Slurm's
    src/common/env.c: env_array_for_step sets them, env_array_for_batch_job does not)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def launcher_world_size() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE, srun's step task count),
    1 without one; reads only the environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if _started_by_srun(env):
        return int(env["SLURM_STEP_NUM_TASKS"])
    return 1


def read_launcher_env() -> DistributedEnv:
    """Rank and rendezvous from torchrun's variables, else srun's, else a single process.

    Returns:
        The `DistributedEnv`; a single process gets rank 0 of 1 on 127.0.0.1 and `MASTER_PORT`,
        or port 0 (its store then binds a free one: `initialize_distributed`).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
        world = launcher_world_size()
        return DistributedEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            # a world of one without an address binds its store where the OS says
            master_port=int(env.get("MASTER_PORT", 29500 if world > 1 else 0)),
        )
    if _started_by_srun(env):  # srun, one task per GPU
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            # The step's task count: SLURM_NTASKS is the job's unless srun overwrote it.
            world_size=launcher_world_size(),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(),
            # A port derived from the job id keeps concurrent jobs on a node apart.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 10000)),
        )
    return DistributedEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, and Megatron's model-parallel RNG tracker.

    Megatron offsets the tracker seed by TP/EP rank for TP-sharded regions; the default generator
    gets the same seed on every rank so replicated weights start identical.

    Args:
        seed: The seed, the same on every rank.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # model_parallel_cuda_manual_seed leaves the default generator at `seed` on GPU (CUDA) and
    # on CPU through the compat tracker; set it again so both paths agree.
    torch.manual_seed(seed)


_FALLBACKS_LOGGED = False


def _log_fallbacks_once() -> None:
    """One line in place of the start-up warnings silenced in `sara_megatron/__init__.py`."""
    global _FALLBACKS_LOGGED
    fallbacks = fallbacks_in_use()
    if fallbacks and not _FALLBACKS_LOGGED:
        log.info("fallbacks in use: %s", ", ".join(fallbacks))
    _FALLBACKS_LOGGED = True


def initialize_distributed(
    parallel: ParallelConfig = ParallelConfig(), seed: int = 1234, timeout_minutes: int = 30
) -> DistributedEnv:
    """Start torch.distributed (if needed) and Megatron's parallel state for `parallel`.

    NCCL (with gloo for CPU tensors) when CUDA is there, gloo otherwise; the CPU or no-TE
    compatibility patches are applied first. An existing parallel state is replaced.

    Args:
        parallel: The model-parallel layout.
        seed: The seed handed to `set_seed`.
        timeout_minutes: The process group's collective timeout.

    Returns:
        This process's `DistributedEnv`.

    Raises:
        ValueError: The layout does not fit the launcher's world size.
    """
    from megatron.core import parallel_state

    denv = read_launcher_env()
    parallel.validate_world(denv.world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
        apply_no_transformer_engine_compat()
    else:
        apply_cpu_compat()
    _log_fallbacks_once()

    if not dist.is_initialized():
        # torchrun exports MASTER_* (and may serve the store itself): use them. Otherwise an
        # explicit address rather than writing MASTER_* into os.environ, which child processes
        # (tools this process launches) would inherit along with a port already taken.
        launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
        timeout = datetime.timedelta(minutes=timeout_minutes)
        rendezvous = {"init_method": "env://" if launched else
                      f"tcp://{denv.master_addr}:{denv.master_port}"}
        if not launched and denv.master_port == 0:
            # One process alone: its store binds a port the OS picks, rather than a port found
            # free earlier that another process may take first (concurrent runs on one host).
            store = dist.TCPStore(denv.master_addr, 0, 1, is_master=True, timeout=timeout)
            denv = dataclasses.replace(denv, master_port=store.port)
            rendezvous = {"store": store}
        dist.init_process_group(
            **rendezvous,
            # gloo beside NCCL on GPU: small CPU-side collectives (all_gather_object of reports,
            # CPU scalars) then work on the default group too.
            backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timeout,
            **({"device_id": torch.device("cuda", torch.cuda.current_device())} if use_cuda else {}),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        # The distributed optimizer asks for megatron's gloo groups (its CPU-side collectives),
        # on a gloo-only run too.
        create_gloo_process_groups=True,
    )
    set_seed(seed)
    log.info(
        "distributed: rank %d/%d backend=%s tp=%d pp=%d ep=%d cp=%d dp=%d",
        denv.rank, denv.world_size, dist.get_backend(), parallel.tp, parallel.pp, parallel.ep,
        parallel.cp, parallel_state.get_data_parallel_world_size(),
    )
    return denv


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# The groups the library's collectives use (routing capture and the SARA loss: tp, tp_cp; prior
# extraction and the loss's logging: dp, pp).
MODEL_PROCESS_GROUPS = ("tp", "cp", "tp_cp", "pp", "dp", "dp_cp")


def model_process_groups():
    """Megatron's parallel state as a `ProcessGroupCollection`, read once by an entry point (the
    trainer, a tool) and handed down to what runs collectives; None before
    `initialize_distributed` (one process, no model parallelism)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not parallel_state.model_parallel_is_initialized():
        return None
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(MODEL_PROCESS_GROUPS))
