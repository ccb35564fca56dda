"""The one interface every training objective implements, and the registry `sara.objective` reads.

An objective is a loss term beside the CE and megatron's load-balancing loss (SARA's routing
alignment, the AES and ShifCon baselines). The trainer knows none of them by name: it asks the
registry for the class `sara.objective` names and calls the same methods on it at each point of a
run (docs/architecture.md, "Where to add things"):

    config load     `check_config`      refuse settings that cannot run together (ValueError)
    preflight       `check_paths`, `preflight`   report problems; resolve what `build` needs
    build           `build`             construct the term, attach its hooks to the model chunks
    each step       `prepare_step`      anchor forwards, calibration, weights from global counts;
                                        the inputs each micro-batch needs ride on the micro-batch
                                        (`SaraMicroBatch.objective_inputs`)
    each forward    `router_observer`, `set_micro_batch`
    after a step    `metrics`           one shape: named scalars, and values per layer
    checkpoints     `checkpoint_record` what the checkpoint records of the term

A new objective is one module (a subclass decorated with `register_objective`) and, when it has
settings, its config section: a pydantic model named by `section`/`Section`, read as
`cfg.objective_section(name)` and refused when its keys are unknown, like every other section.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import torch


@dataclasses.dataclass
class ObjectiveMetrics:
    """What an objective logs after a step, reduced over the ranks.

    Attributes:
        terms: name -> value; every rank holds the same values. The names are the log's keys.
        per_layer: global 0-based layer -> value (SARA's divergence per aligned layer), or empty.
    """

    terms: dict[str, float] = dataclasses.field(default_factory=dict)
    per_layer: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PreflightChecks:
    """What preflight knows when it asks an objective for its problems.

    Attributes:
        problems: Every problem found so far; an objective appends its own (one line each).
        bad_paths: Config keys whose paths failed `check_paths` (their reads are skipped).
        arch: The model's `MoEArchitecture`, or None when it could not be resolved.
        dataset: The training samples (`data.sara_dataset.SaraTrainingSamples`), or None
            (data.mock, or the shards could not be opened).
    """

    problems: list[str]
    bad_paths: set[str]
    arch: Any = None
    dataset: Any = None

    def attempt(self, check: Callable[[], Any]) -> Any:
        """check()'s result, or None with its ValueError recorded as a problem.

        Args:
            check: A call that raises ValueError for a problem the user can fix.

        Returns:
            What `check` returned, or None when it raised ValueError.

        Raises:
            UserFacingError: A damaged file's own error, at once.
        """
        from sara_megatron.tool_errors import UserFacingError

        try:
            return check()
        except UserFacingError:
            raise
        except ValueError as err:
            self.problems.append(str(err))
            return None


@dataclasses.dataclass
class StepContext:
    """One step as an objective's `prepare_step` sees it.

    Attributes:
        chunks: This rank's model chunks (DDP-wrapped), one per virtual pipeline stage.
        microbatches: This rank's micro-batches of the step, on the device. An objective may
            replace them (with inputs of its own on each: `SaraMicroBatch.objective_inputs`).
        loss_tokens: [] float64, response tokens of the global batch.
        sequences: [] float64, samples with a token in the global batch.
        tokens: [] float64, non-padding tokens of the global batch.
        device: Where the model runs.
        plan: The run's `RunPlan`.
        process_groups: Megatron's `ProcessGroupCollection`; None is one process alone.
        run_forward_only: Runs the step's micro-batches forward through megatron's schedule
            without gradient (AES's calibration); observers stay the caller's to install.
    """

    chunks: list
    microbatches: list
    loss_tokens: torch.Tensor
    sequences: torch.Tensor
    tokens: torch.Tensor
    device: torch.device
    plan: Any
    process_groups: Any
    run_forward_only: Callable[[], Any]


class Objective:
    """A training objective's term; see the module docstring for when each method is called.

    Class attributes:
        name: The value of `sara.objective` that selects it.
        section: The config section holding its settings, or None.
        Section: The pydantic model of that section when `TrainConfig` does not declare it
            (a section of its own, registered with the objective); None otherwise.
    """

    name: ClassVar[str]
    section: ClassVar[Optional[str]] = None
    Section: ClassVar[Optional[type]] = None
    # The cross-entropy's weight in the loss this objective trains (ShifCon's released 0.5).
    ce_weight: float = 1.0

    # --- before anything is built --------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, at config load, settings that cannot run together.

        Args:
            cfg: The `TrainConfig` being loaded.

        Raises:
            ValueError: One line naming the settings to change.
        """

    @classmethod
    def check_paths(cls, cfg, need: Callable[..., None]) -> None:
        """Name the input paths the objective reads.

        Args:
            cfg: The run's `TrainConfig`.
            need: Called as need(key, path, what, folder=True) for each path; preflight names
                a missing one with its key.
        """

    @classmethod
    def preflight(cls, cfg, checks: PreflightChecks) -> Any:
        """Append the objective's problems to `checks.problems`; return what `build` needs.

        Args:
            cfg: The run's `TrainConfig`.
            checks: What preflight resolved (architecture, training samples) and its problems.

        Returns:
            Anything `build` reads back as `plan.objective_inputs` (ShifCon: its language
            vectors); None when there is nothing.
        """
        return None

    @classmethod
    def builds_term(cls, cfg) -> bool:
        """Whether the run builds this term at all (SARA without priors at λ_JS = 0: no).

        Args:
            cfg: The run's `TrainConfig`.
        """
        return True

    @classmethod
    def needs_anchor_rows(cls, cfg) -> bool:
        """Whether each micro-batch must carry its samples' anchor rows (anchor forwards).

        Args:
            cfg: The run's `TrainConfig`.
        """
        return False

    @classmethod
    def checkpoint_record(cls, cfg, plan) -> dict:
        """What every checkpoint records of the term, compared (with a warning) on resume.

        Args:
            cfg: The run's `TrainConfig`.
            plan: Its `RunPlan`.

        Returns:
            JSON-able settings, written under the checkpoint's `sara` record.
        """
        return {"lambda_js": 0.0, "alignment_layers": []}

    @classmethod
    def build(cls, cfg, plan, chunks: list, model_config, process_groups) -> "Objective":
        """The term for this run, its hooks attached to the bare (not yet DDP-wrapped) chunks.

        Args:
            cfg: The run's `TrainConfig`.
            plan: The `RunPlan` preflight returned (`plan.objective_inputs`: what `preflight`
                resolved).
            chunks: This rank's model chunks.
            model_config: megatron's TransformerConfig of the chunks.
            process_groups: Megatron's `ProcessGroupCollection`; None is one process alone.

        Returns:
            The objective, ready for `prepare_step`.
        """
        raise TypeError(f"{cls.__name__} does not define build")

    # --- each step -----------------------------------------------------------------------------

    def router_observer(self):
        """A router observer (`routing.observers.RouterObserver`) for the training forward, or
        None."""
        return None

    def prepare_step(self, step: StepContext) -> list:
        """Get ready for one step, before its forward and backward.

        Args:
            step: The step's micro-batches, global counts and model.

        Returns:
            The step's micro-batches, replaced where this objective adds inputs of its own.
        """
        return step.microbatches

    def set_micro_batch(self, mb, inputs, padding_mask: torch.Tensor) -> None:
        """Take one micro-batch's inputs before its forward on a model chunk.

        Args:
            mb: The `SaraMicroBatch` (its `objective_inputs` hold what `prepare_step` added).
            inputs: Its `routing.forward_inputs.ModelInputs` on this CP rank.
            padding_mask: [B, S_cp] bool, True = padding, this CP rank's part.
        """

    def metrics(self, num_layers: int) -> ObjectiveMetrics:
        """The step's values reduced over the ranks (collective: every rank calls it).

        Args:
            num_layers: The model's layer count.

        Returns:
            The metrics; none by default.
        """
        return ObjectiveMetrics()

    def load_checkpoint_files(self, folder: str) -> None:
        """Continue from what `write_checkpoint_files` wrote into the checkpoint a run resumes
        from (every rank, after the weights are loaded).

        Args:
            folder: The checkpoint folder being resumed.
        """

    def write_checkpoint_files(self, folder: str) -> None:
        """Write files the trained model needs besides its weights into a checkpoint being saved
        (rank 0, the staging folder, before its manifest); they travel with the export.

        Args:
            folder: The checkpoint's staging folder.
        """


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make `cls` selectable as `sara.objective: <cls.name>` (use as a class decorator).

    Args:
        cls: An `Objective` subclass with a `name` (and a `Section` for a section of its own).

    Returns:
        `cls`.

    Raises:
        ValueError: Another class holds the name, or its section would shadow another one.
    """
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    held = _REGISTRY.get(cls.name)
    if held is not None and held.__qualname__ != cls.__qualname__:
        raise ValueError(f"objective {cls.name!r} is already {held.__qualname__}")
    if cls.Section is not None:
        owners = {o.section: o for o in _REGISTRY.values() if o.Section is not None
                  and o.name != cls.name}
        if cls.section in owners:
            raise ValueError(f"config section {cls.section!r} is already "
                             f"{owners[cls.section].__qualname__}'s")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_objective(name: str) -> None:
    """Forget a registered objective (a plugin's or a test's).

    Args:
        name: Its `sara.objective` name; a name not registered is a no-op.
    """
    _REGISTRY.pop(name, None)
