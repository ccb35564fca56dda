"""Which training objective a run uses, and the settings each needs (docs/objectives.md).

    sara.objective: sara     CE + λ_LB·LB + λ_JS·D(anchor ‖ target routing); λ_JS = 0 is FFT
                    aes      CE + λ_LB·LB − w_var·Var(routing scores) + w_orth·L_orth (Guo et al.)
                    shifcon  CE + λ_LB·LB + λ_con·InfoNCE between shifted samples and their anchors
    sara.divergence: js | kl | js_entropy_normalised   (D above)
    sara.priors:     store (the offline prior store) | online (anchor forward in the same step)
"""

from __future__ import annotations

OBJECTIVES = ("sara", "aes", "shifcon")
PRIOR_SOURCES = ("store", "online")


def check_objective_setting(config) -> None:
    """Refuse, at config load, combinations that cannot run (a `TrainConfig`)."""
    sara = config.sara
    if config.model.token_dispatcher not in (None, "allgather", "alltoall"):
        raise ValueError(f"model.token_dispatcher must be allgather or alltoall (or unset), got "
                         f"{config.model.token_dispatcher!r}")
    if sara.objective == "shifcon":
        s = config.shifcon
        missing = [k for k in ("language_vectors", "shift_layer", "shift_back_layer")
                   if getattr(s, k) is None]
        if missing:
            raise ValueError(f"sara.objective shifcon needs {', '.join('shifcon.' + k for k in missing)}")
        if s.shift_layer >= s.shift_back_layer:
            raise ValueError(f"shifcon.shift_layer ({s.shift_layer}) must come before "
                             f"shifcon.shift_back_layer ({s.shift_back_layer})")
        if config.data.prior_store or config.data.mock:
            raise ValueError("sara.objective shifcon reads no anchor priors and needs real shards: "
                             "leave data.prior_store unset and data.mock false")
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
