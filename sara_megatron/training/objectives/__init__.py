"""Training objectives: the `Objective` interface (`base.py`) and the built-in ones, SARA
(`sara.py`), AES (`aes.py`) and ShifCon (`shifcon.py`), registered under the names
`sara.objective` takes. docs/architecture.md says how to add one.
"""

from sara_megatron.training.objectives.base import (
    _REGISTRY,
    Objective,
    ObjectiveMetrics,
    PreflightChecks,
    StepContext,
    register_objective,
    unregister_objective,
)
from sara_megatron.training.objectives.sara import SaraObjective
from sara_megatron.training.objectives.aes import AesObjective
from sara_megatron.training.objectives.shifcon import ShifconTrainingObjective

__all__ = ["AesObjective", "Objective", "ObjectiveMetrics", "PreflightChecks", "SaraObjective",
           "ShifconTrainingObjective", "StepContext", "objective_class", "objective_sections",
           "register_objective", "registered_objectives",
           "unregister_objective"]


def registered_objectives() -> dict[str, type[Objective]]:
    """The registry, name -> class of every registered objective (the built-in ones first)."""
    return dict(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The class `sara.objective: <name>` selects.

    Args:
        name: A `sara.objective` value.

    Raises:
        ValueError: No objective has that name.
    """
    objectives = registered_objectives()
    if name not in objectives:
        raise ValueError(f"sara.objective must be one of {', '.join(objectives)}, got {name!r}")
    return objectives[name]


def objective_sections() -> dict[str, type]:
    """The sections objectives register themselves: section key -> its pydantic model."""
    return {o.section: o.Section for o in registered_objectives().values()
            if o.Section is not None}
