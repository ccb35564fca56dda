"""Which training objective a run uses, and the settings each needs (issue 19, docs/objectives.md).

    sara.objective: sara     CE + λ_LB·LB + λ_JS·D(anchor ‖ target routing); λ_JS = 0 is FFT
                    aes      CE + λ_LB·LB − w_var·Var(routing scores) + w_orth·L_orth (Guo et al.)
                    shifcon  not built (see check_objective_setting)
    sara.divergence: js | kl | js_entropy_normalised   (D above)
    sara.priors:     store (the offline prior store) | online (anchor forward in the same step)
"""

from __future__ import annotations

OBJECTIVES = ("sara", "aes", "shifcon")
PRIOR_SOURCES = ("store", "online")


def check_objective_setting(config) -> None:
    """Refuse, at config load, combinations that cannot run (a `TrainConfig`)."""
    sara = config.sara
    if sara.objective == "shifcon":
        raise NotImplementedError(
            "ShifCon objective (issue 19 item 2) is not built: language vectors, the shift at an "
            "early layer and back at a later one, and the contrastive loss are still to be "
            "written; use sara.objective sara or aes")
    if sara.divergence != "js" and sara.impl == "triton":
        raise ValueError(f"sara.divergence {sara.divergence} runs the PyTorch reference; the "
                         "fused kernel (sara.impl triton) computes JS only: set sara.impl auto")
    if sara.priors == "online":
        if sara.objective != "sara":
            raise ValueError(f"sara.priors online feeds the SARA term; sara.objective is "
                             f"{sara.objective}")
        if config.data.prior_store:
            raise ValueError("sara.priors online takes its priors from the anchor forward: "
                             "leave data.prior_store unset")
        if config.data.mock:
            raise ValueError("sara.priors online needs the anchor rows of real shards; "
                             "data.mock has none")
    if sara.objective == "aes" and config.data.prior_store:
        raise ValueError("sara.objective aes reads no anchor priors: leave data.prior_store unset")
