"""Everything a run's settings must pass before anything is built, in one call.

`preflight(cfg)` checks the paths first (so that a missing `model.checkpoint` is named before
anything would read it), then the settings against the model, the data
and, when the run resumes, the checkpoint. It raises one `PreflightError` naming every problem it
found, or returns the `RunPlan` those checks resolved (architecture, aligned layers, schedule
length, resume point), from which `training.state.build_state` builds the run. A damaged file
(shard, checkpoint, prior store) stops it at once with that file's own error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Optional

from sara_megatron.checkpointing import check_recorded_architecture
from sara_megatron.model_folders import check_megatron_checkpoint
from sara_megatron.models.architecture import MoEArchitecture, resolve_architecture
from sara_megatron.models.longrope_padding import same_rope_regime
from sara_megatron.sara import select_alignment_layers
from sara_megatron.tool_errors import UserFacingError
from sara_megatron.training.checkpoint import (
    LATEST_FILE,
    iteration_dir,
    latest_iteration,
    read_training_state,
    resume_iteration,
)
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.objectives import PreflightChecks, objective_class

log = logging.getLogger(__name__)


class PreflightError(UserFacingError, ValueError):
    """Settings the run cannot start with: every problem found, in one message.

    Args:
        problems: One line per problem (the message lists them; one alone is the message).
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a run resumes from.

    Attributes:
        checkpoint_dir: Its `iter_N` folder.
        iteration: The step it was saved at.
        consumed_samples: Positions of the global sample order consumed by then.
        saved: Its small state (`read_training_state`): trainer, scheduler, param_groups.
    """
    checkpoint_dir: str
    iteration: int
    consumed_samples: int
    saved: dict  # the checkpoint's small state (read_training_state): trainer, scheduler, ...


@dataclasses.dataclass
class RunPlan:
    """What the checks resolved: what `build_state` builds, and what each checkpoint records."""

    arch: MoEArchitecture  # cut to model.num_layers when set
    alignment_layers: list[int]
    sara_term: bool  # the SARA routing loss is built (objective sara, with priors to read)
    dp_rank: int
    dp_size: int
    num_microbatches: int  # per step and data-parallel rank
    train_steps: int  # the schedule's length
    data_epochs: int  # passes over the samples the loader holds (enough for train_steps)
    languages: list[str]  # the training languages, resolved ([] with data.mock)
    samples: int  # training samples of one epoch (0 with data.mock)
    # what the objective's preflight resolved for its build (ShifCon: its LanguageVectors)
    objective_inputs: Any = None
    resume: Optional[ResumePoint] = None


# --- what each checkpoint records, and what a resume compares ---------------------------------


def scheduler_settings(cfg: TrainConfig, train_steps: int) -> dict:
    """megatron's OptimizerParamScheduler arguments: linear warmup over optim.warmup_fraction of
    the run, cosine decay to optim.min_lr, constant weight decay. Always the config's: a resume
    whose saved schedule differs is refused (unless optim.override_scheduler), so loading restores
    only the step count (megatron's default would silently keep the checkpoint's lr, min_lr and
    weight decay).

    Args:
        cfg: The run's config (`optim`).
        train_steps: The schedule's length in steps.

    Returns:
        The keyword arguments of `OptimizerParamScheduler` (less the optimizer).
    """
    o = cfg.optim
    return dict(init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
                lr_warmup_steps=int(o.warmup_fraction * train_steps), lr_decay_steps=train_steps,
                lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
                wd_incr_steps=train_steps, wd_incr_style="constant",
                use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def _scheduler_state(cfg: TrainConfig, train_steps: int) -> dict:
    """The scheduler's state_dict for these settings, less its step count (as megatron orders it)."""
    s = scheduler_settings(cfg, train_steps)
    return {"max_lr": float(s["max_lr"]), "lr_warmup_steps": s["lr_warmup_steps"],
            "lr_decay_style": s["lr_decay_style"], "lr_decay_steps": s["lr_decay_steps"],
            "min_lr": s["min_lr"], "start_wd": s["start_wd"], "end_wd": s["end_wd"],
            "wd_incr_style": s["wd_incr_style"], "wd_incr_steps": s["wd_incr_steps"]}


def data_stream(cfg: TrainConfig, plan: RunPlan) -> dict:
    """The settings that decide which sample sits at each position of the global sample order,
    which consumed_samples counts: saved with every checkpoint, checked on resume.

    Args:
        cfg: The run's config (seed, data).
        plan: Its `RunPlan` (resolved languages and sample count).
    """
    d = cfg.data
    # Not the global batch: it sets how many positions a step takes, not which sample sits at
    # each (sample_order.GlobalSampleOrder), so a resume may change it.
    stream = {"seed": cfg.seed, "mock": bool(d.mock)}
    if not d.mock:
        stream.update(shuffle=bool(d.shuffle), languages=list(plan.languages), samples=plan.samples)
    return stream


def sara_settings(cfg: TrainConfig, plan: RunPlan) -> dict:
    """What the run's objective is: saved with every checkpoint; a resume that changes it warns.

    Args:
        cfg: The run's config.
        plan: Its `RunPlan`.

    Returns:
        The objective's own record (`Objective.checkpoint_record`: λ_JS and the aligned layers,
        0 and none without a SARA term), then the objective, divergence and prior source where
        not the paper's (so that checkpoints of plain SARA runs keep their record).
    """
    settings = objective_class(cfg.sara.objective).checkpoint_record(cfg, plan)
    for key, paper in (("objective", "sara"), ("divergence", "js"), ("priors", "store")):
        if getattr(cfg.sara, key) != paper:
            settings[key] = getattr(cfg.sara, key)
    return settings


def adam_settings(param_groups) -> list[tuple]:
    """The distinct (beta1, beta2, eps) of optimizer param groups (live or as saved), sorted.

    Args:
        param_groups: Param-group dicts; those without betas and eps are skipped.
    """
    return sorted({(*g["betas"], g["eps"]) for g in param_groups if "betas" in g and "eps" in g})


# --- the one call -----------------------------------------------------------------------------


def preflight(cfg: TrainConfig) -> RunPlan:
    """Check the run's settings against its paths, model, data and checkpoint; raise one
    PreflightError naming every problem, else return the RunPlan. Needs megatron's parallel state
    (initialize_distributed); collective when checkpoint.resume is set (every rank calls it).

    Args:
        cfg: The run's config.

    Returns:
        The `RunPlan` the checks resolved (architecture, aligned layers, batch split, schedule
        length, languages, resume point).

    Raises:
        PreflightError: Every problem found, in one message.
    """
    from megatron.core import parallel_state as ps

    problems: list[str] = []
    bad_paths = _check_paths(cfg, problems)
    arch = _architecture(cfg, problems)
    if arch is not None and cfg.model.checkpoint and "model.checkpoint" not in bad_paths:
        _check_starting_checkpoint(cfg, arch, problems)
    sara_term = _check_objective(cfg, problems)
    if cfg.peft.lora:
        _check_peft(cfg, problems)

    d = cfg.data
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_step = d.micro_batch_size * dp_size
    if d.global_batch_size % per_step:
        problems.append(f"global batch {d.global_batch_size} is not a multiple of micro batch × "
                        f"data parallel = {d.micro_batch_size} × {dp_size}")

    layers: list[int] = []
    if arch is not None:
        layers = _attempt(problems, lambda: select_alignment_layers(
            arch.num_layers, cfg.sara.layers, family=arch.family, first=cfg.sara.first_layer,
            last=cfg.sara.last_layer, seed=cfg.sara.layer_seed)) or []

    dataset = None
    if not d.mock and not {"data.shards_dir", "data.prior_store"} & bad_paths:
        dataset = _attempt(problems, lambda: _training_samples(cfg))
    seq_length, steps, epochs = d.seq_length, cfg.optim.train_steps, 1
    if dataset is not None:
        seq_length = d.seq_length or dataset.shards.seq_length
        if arch is not None:
            _check_truncation(cfg, dataset, problems)
            _check_rope_regime(cfg, arch, dataset.shards.seq_length, problems)
        steps, epochs = _schedule_length(cfg, len(dataset), problems)
    # the objective's own rules, and what its build needs (ShifCon: its language vectors)
    objective_inputs = objective_class(cfg.sara.objective).preflight(
        cfg, PreflightChecks(problems, bad_paths, arch, dataset))
    if seq_length:
        _check_sequence_split(seq_length, problems)
    if d.packing and arch is not None:
        from sara_megatron.models.builder import transformer_engine_available
        from sara_megatron.training.packed_step import check_packing_config

        _attempt(problems, lambda: check_packing_config(
            cfg, arch, seq_length or 0,
            use_te=(transformer_engine_available() if cfg.model.use_te is None
                    else cfg.model.use_te),
            context_parallel=ps.get_context_parallel_world_size()))
    if steps:
        _check_schedule(cfg, steps, problems)

    if not cfg.checkpoint.save_dir and _rank() == 0:
        log.warning("checkpoint.save_dir is not set: nothing of this run will be saved "
                    "(the trained weights are lost when it ends)")
    plan = RunPlan(arch, layers, sara_term, dp_rank, dp_size,
                   d.global_batch_size // per_step, steps or 0, epochs,
                   list(dataset.languages) if dataset is not None else [],
                   len(dataset) if dataset is not None else 0, objective_inputs)
    # Collective (resume_iteration agrees on the newest intact checkpoint): every rank gets here.
    plan.resume = _resume_point(cfg, "checkpoint.save_dir" in bad_paths)
    if plan.resume is not None and arch is not None:
        _attempt(problems, lambda: check_recorded_architecture(arch, plan.resume.checkpoint_dir))
        from sara_megatron.peft.runs import resume_problem

        peft_problem = resume_problem(plan.resume.saved.get("trainer", {}), cfg,
                                      plan.resume.checkpoint_dir)
        if peft_problem:
            problems.append(peft_problem)
        if steps and (dataset is not None or d.mock):
            _check_resume(cfg, plan, problems)
    if problems:
        raise PreflightError(problems)
    return plan


def _attempt(problems: list[str], check):
    """check()'s result, or None with its ValueError recorded as a problem (a damaged file's
    UserFacingError stops at once)."""
    return PreflightChecks(problems, set()).attempt(check)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


# --- paths ------------------------------------------------------------------------------------


def _check_paths(cfg: TrainConfig, problems: list[str]) -> set[str]:
    """Every input path the config names exists, as the kind of thing it must be; returns the
    keys that failed (the checks that would read them are skipped)."""
    d, m = cfg.data, cfg.model
    bad = set()

    def need(key: str, path: Optional[str], what: str, folder: bool = True) -> None:
        if not path:
            return
        exists = os.path.isdir(path) if folder else os.path.isfile(path)
        if not exists:
            kind = "folder" if folder else "file"
            problems.append(f"{key} {path}: " + (f"not a {kind}" if os.path.exists(path)
                                                 else f"no such {kind}") + f" ({what})")
            bad.add(key)

    need("model.checkpoint", m.checkpoint, "a converted checkpoint, as tools/convert_hf.py "
         "import writes, or an iteration folder of a training run")
    if not d.mock:
        if not d.shards_dir:
            problems.append("data.shards_dir is not set (the token shards, as "
                            "tools/shard_corpus.py writes them), nor data.mock")
            bad.add("data.shards_dir")
        need("data.shards_dir", d.shards_dir, "the token shards, as tools/shard_corpus.py writes them")
    need("data.prior_store", d.prior_store, "the anchor priors, as tools/extract_priors.py writes them")
    objective_class(cfg.sara.objective).check_paths(cfg, need)
    save_dir = cfg.checkpoint.save_dir
    if save_dir and os.path.exists(save_dir) and not os.path.isdir(save_dir):
        problems.append(f"checkpoint.save_dir {save_dir} is a file, not a folder")
        bad.add("checkpoint.save_dir")
    return bad


# --- the model ------------------------------------------------------------------------------


def _architecture(cfg: TrainConfig, problems: list[str]) -> Optional[MoEArchitecture]:
    arch = _attempt(problems, lambda: resolve_architecture(cfg.model.preset))
    n = cfg.model.num_layers
    if arch is None or n is None:
        return arch
    if not 1 <= n <= arch.num_layers:
        problems.append(f"model.num_layers must be in 1..{arch.num_layers}, got {n}")
        return None
    return dataclasses.replace(arch, num_layers=n)


def _check_starting_checkpoint(cfg: TrainConfig, arch: MoEArchitecture,
                               problems: list[str]) -> None:
    checkpoint = cfg.model.checkpoint
    if os.path.exists(os.path.join(checkpoint, LATEST_FILE)):
        problems.append(
            f"model.checkpoint {checkpoint} is a training run's folder: name one of its "
            f"iteration folders (e.g. {iteration_dir(checkpoint, latest_iteration(checkpoint))})"
            ", or make it the run's checkpoint.save_dir to resume that run")
        return
    _attempt(problems, lambda: check_megatron_checkpoint(checkpoint, "model.checkpoint"))
    _attempt(problems, lambda: check_recorded_architecture(arch, checkpoint))


def _check_objective(cfg: TrainConfig, problems: list[str]) -> bool:
    """Whether the SARA term is built (objective sara, with priors to read)."""
    d = cfg.data
    if d.mock and not (cfg.optim.train_steps and d.seq_length):
        problems.append("data.mock needs optim.train_steps and data.seq_length")
    objective = objective_class(cfg.sara.objective)
    return objective.name == "sara" and objective.builds_term(cfg)


def _check_peft(cfg: TrainConfig, problems: list[str]) -> None:
    """The LoRA combinations not built (docs/peft.md)."""
    from sara_megatron.models.builder import transformer_engine_available

    p = cfg.peft
    use_te = transformer_engine_available() if cfg.model.use_te is None else cfg.model.use_te
    if use_te:
        problems.append("peft.method lora adapts megatron's local layer spec only, not Transformer "
                        "Engine's fused layers: set model.use_te false")
    if "shared_experts" in p.targets:
        problems.append(f"peft.targets shared_experts: model {cfg.model.preset} has no shared "
                        "experts")
    if cfg.sara.objective == "aes" and p.router == "lora":
        problems.append("sara.objective aes with peft.router lora: AES's orthogonality "
                        "calibration reads the router weight, which the adapter leaves out; use "
                        "peft.router full or frozen")
    if p.online_priors == "base" and cfg.sara.priors != "online":
        problems.append("peft.online_priors base chooses the model of the online anchor "
                        "forward: it needs sara.priors online")



# --- the data ---------------------------------------------------------------------------------


def _training_samples(cfg: TrainConfig):
    """The training samples' list (token shards opened, and verified as data.verify_shards says)."""
    from sara_megatron.data.sara_dataset import SaraTrainingSamples, resolve_languages
    from sara_megatron.data.token_shards import TokenShards

    shards = TokenShards(cfg.data.shards_dir, verify=cfg.data.verify_shards)
    return SaraTrainingSamples(shards, resolve_languages(shards, cfg.data.languages))


def _check_truncation(cfg: TrainConfig, dataset, problems: list[str]) -> None:
    """Refuse a data.seq_length that cuts training samples when SARA reads anchor priors.

    The batches cut every sample at data.seq_length, while the priors were extracted on whole
    anchor sequences: JS would compare the routing profile of a sample's first data.seq_length
    tokens with that of its whole anchor. Without that term a cut only shortens what the loss
    sees, which may be meant: a warning then."""
    d = cfg.data
    if not d.seq_length:
        return  # the shards' own length: nothing is cut
    lengths = [sample.meta.token_count for sample in dataset.samples]
    cut = sum(n > d.seq_length for n in lengths)
    if not cut:
        return
    what = (f"data.seq_length={d.seq_length} cuts {cut} of {len(lengths)} training samples "
            f"(the longest has {max(lengths)} tokens; the shards were written for "
            f"{dataset.shards.seq_length})")
    if d.prior_store and cfg.sara.lambda_js > 0:
        problems.append(
            f"{what}, but the anchor priors in {d.prior_store} were extracted on whole "
            f"sequences: SARA would align the routing of cut samples with that of whole anchors. "
            f"Set data.seq_length to {max(lengths)} or more (or leave it unset: the shards' "
            f"length), or run without SARA (sara.lambda_js=0)")
    else:
        log.warning("%s: those samples are trained on their first %d tokens only", what,
                    d.seq_length)


def _check_rope_regime(cfg: TrainConfig, arch: MoEArchitecture, shards_length: int,
                       problems: list[str]) -> None:
    """Refuse a data.seq_length on the other side of the longrope switch from the shards' when
    SARA reads anchor priors: batches are padded to data.seq_length, so every position would get
    the other rope factors than the priors were extracted with (extraction pads by the shards'
    length, see models.longrope_padding)."""
    d = cfg.data
    if not (d.seq_length and d.prior_store and cfg.sara.lambda_js > 0):
        return
    switch = arch.longrope.original_max_position_embeddings if arch.longrope else None
    if not same_rope_regime(d.seq_length, shards_length, switch):
        problems.append(
            f"data.seq_length={d.seq_length} and the shards' seq_length {shards_length} lie on "
            f"either side of the longrope switch at {switch} positions: training would use other "
            f"rope factors than the anchor priors in {d.prior_store} were extracted with. Leave "
            f"data.seq_length unset (the shards' length), or shard with a seq_length on the "
            f"same side of the switch")


def _schedule_length(cfg: TrainConfig, samples_per_epoch: int,
                     problems: list[str]) -> tuple[int, int]:
    """(steps, passes over the data the loader must hold) for this many samples per epoch."""
    d = cfg.data
    steps = cfg.optim.train_steps or int(d.epochs * samples_per_epoch // d.global_batch_size)
    if steps < 1:
        problems.append(f"{d.epochs} epoch(s) of {samples_per_epoch} samples make no step of "
                        f"global batch {d.global_batch_size}")
        return 0, 1
    # An explicit step count may need more passes over the data than `epochs` says.
    epochs_needed = math.ceil(steps * d.global_batch_size / samples_per_epoch)
    return steps, max(1, math.ceil(d.epochs), epochs_needed)


def _check_sequence_split(seq_length: int, problems: list[str]) -> None:
    """Every batch is padded to `seq_length`: CP cuts it in 2·cp chunks, then sequence parallel
    (on whenever TP > 1, models.builder) cuts a CP rank's part in TP pieces. Refuse at start what
    would fail mid-step."""
    from megatron.core import parallel_state as ps

    cp = ps.get_context_parallel_world_size()
    tp = ps.get_tensor_model_parallel_world_size()
    cp_chunks = 2 * cp if cp > 1 else 1
    if seq_length % cp_chunks or (seq_length // cp) % tp:
        problems.append(
            f"sequence length {seq_length} does not split over context parallel {cp} "
            f"({cp_chunks} equal chunks) and then sequence parallel {tp} (a CP rank's "
            f"{seq_length // cp} tokens in equal parts): change data.seq_length")


def _check_schedule(cfg: TrainConfig, steps: int, problems: list[str]) -> None:
    """What megatron's scheduler asserts, as settings to change."""
    o = cfg.optim
    if o.min_lr > o.lr:
        problems.append(f"optim.min_lr ({o.min_lr}) is above optim.lr ({o.lr})")
    warmup = scheduler_settings(cfg, steps)["lr_warmup_steps"]
    if warmup >= steps:
        problems.append(f"optim.warmup_fraction={o.warmup_fraction} makes a warmup of {warmup} "
                        f"steps, the whole schedule of {steps}: the schedule needs at least one "
                        f"step after its warmup (lower optim.warmup_fraction)")


# --- resuming ---------------------------------------------------------------------------------


def _resume_point(cfg: TrainConfig, save_dir_bad: bool) -> Optional[ResumePoint]:
    c = cfg.checkpoint
    # Collective: the latest checkpoint whose files match its manifest (see resume_iteration).
    iteration = c.resume and not save_dir_bad and resume_iteration(c.save_dir, c.strict_resume)
    if not iteration:
        return None
    # The data position only (a small read): checked against the config before any tensor.
    checkpoint_dir = iteration_dir(c.save_dir, iteration)
    saved = read_training_state(checkpoint_dir)
    return ResumePoint(checkpoint_dir, int(saved["trainer"]["iteration"]),
                       int(saved["trainer"]["consumed_samples"]), saved)


# Config setting behind each saved value, for the messages of `_check_resume`.
_DATA_STREAM_SETTINGS = {
    "seed": "seed", "mock": "data.mock",
    "shuffle": "data.shuffle", "languages": "data.languages (resolved)",
    "samples": "training samples (data.shards_dir, data.languages)",
}
_SCHEDULE_SETTINGS = {
    "max_lr": "optim.lr", "min_lr": "optim.min_lr",
    "lr_warmup_steps": "warmup steps (optim.warmup_fraction × schedule length)",
    "lr_decay_steps": "schedule length in steps (optim.train_steps, or data.epochs × "
                      "samples / data.global_batch_size)",
    "lr_decay_style": "lr decay style", "wd_incr_style": "weight decay style",
    "start_wd": "optim.weight_decay",
    # Set from the same settings as the entries above; named once in a message.
    "wd_incr_steps": None, "end_wd": None,
}


def _check_resume(cfg: TrainConfig, plan: RunPlan, problems: list[str]) -> None:
    """Refuse to resume where the checkpoint's data stream or LR schedule differ from the config.

    consumed_samples is a position in a seeded permutation of the training samples: with another
    seed, shuffle, language set or sample count it would point into a different order, repeating
    some samples and skipping others (another global batch only takes more or fewer positions
    per step). A changed schedule would silently take effect mid-run;
    optim.override_scheduler=true makes the config's win. (The kind of optimizer is checked
    against the one built, before its state is loaded: checkpoint.check_optimizer_layout.)"""
    checkpoint_dir, saved = plan.resume.checkpoint_dir, plan.resume.saved
    position = saved.get("trainer", {})
    stream = data_stream(cfg, plan)
    unrecorded = sorted(k for k in stream if k not in position)
    if unrecorded:
        log.warning("%s does not record %s (an older checkpoint): not checked on resume",
                    checkpoint_dir, ", ".join(unrecorded))
    changed = [f"{_DATA_STREAM_SETTINGS[k]}: checkpoint {position[k]!r}, config {v!r}"
               for k, v in stream.items() if k in position and position[k] != v]
    if changed:
        problems.append(
            f"cannot resume from {checkpoint_dir}: the data stream differs from the "
            f"checkpoint's ({'; '.join(changed)}). Its consumed_samples "
            f"({position['consumed_samples']}) counts positions in the sample order those "
            "settings define; another order would repeat some samples and skip others. "
            "Restore the checkpoint's values, or train into another checkpoint.save_dir")

    saved_sara, own_sara = position.get("sara"), sara_settings(cfg, plan)
    if saved_sara is not None and saved_sara != own_sara:
        # A deliberate change (a λ_JS schedule, FFT after SARA) is allowed, never silent.
        extra = {k: (saved_sara.get(k), own_sara.get(k)) for k in ("objective", "divergence", "priors")
                 if saved_sara.get(k) != own_sara.get(k)}  # None: the paper's
        log.warning("resuming from %s with another SARA term: checkpoint λ_JS %s on layers %s, "
                    "config λ_JS %s on layers %s%s", checkpoint_dir, saved_sara["lambda_js"],
                    saved_sara["alignment_layers"], own_sara["lambda_js"],
                    own_sara["alignment_layers"],
                    "".join(f"; sara.{k}: checkpoint {a or 'paper'}, config {b or 'paper'}"
                            for k, (a, b) in extra.items()))

    saved_schedule = saved.get("scheduler", {})
    changed = [f"{_SCHEDULE_SETTINGS.get(k, k)}: checkpoint {saved_schedule[k]!r}, config {v!r}"
               for k, v in _scheduler_state(cfg, plan.train_steps).items()
               if k in saved_schedule and saved_schedule[k] != v
               and _SCHEDULE_SETTINGS.get(k, k) is not None]
    # Adam's settings ride in the saved optimizer param groups, beside the schedule's; megatron
    # gives every param group the config's.
    o = cfg.optim
    saved_adam = adam_settings(saved.get("param_groups", []))
    own_adam = [(o.adam_beta1, o.adam_beta2, o.adam_eps)]
    if saved_adam and saved_adam != own_adam:
        changed.append(f"optim.adam_beta1, adam_beta2, adam_eps: checkpoint "
                       f"{', '.join(map(str, saved_adam))}, config {', '.join(map(str, own_adam))}")
    if not changed:
        return
    if not o.override_scheduler:
        problems.append(
            f"cannot resume from {checkpoint_dir}: the learning-rate schedule or Adam settings "
            f"differ from the checkpoint's ({'; '.join(changed)}). Restore the checkpoint's "
            f"values, or set optim.override_scheduler=true to continue from step "
            f"{plan.resume.iteration} on the config's schedule")
    else:
        log.warning("resuming from %s on the config's schedule (optim.override_scheduler): %s",
                    checkpoint_dir, "; ".join(changed))
