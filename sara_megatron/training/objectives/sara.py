"""SARA's term as a training objective: λ_JS · D(anchor ‖ target routing) on the aligned layers.

The term itself is `sara.loss.SaraRoutingLoss`, a router observer. Its priors come with each
micro-batch: read from the prior store by the loader, or (`sara.priors: online`) from the anchor
forward this objective runs before the step (`sara.online_priors`). λ_JS = 0 runs the very same
code (the FFT baseline); without priors at λ_JS = 0 no term is built at all.
"""

from __future__ import annotations

import dataclasses

from sara_megatron.sara import SaraRoutingLoss
from sara_megatron.training.objectives.base import (
    Objective,
    ObjectiveMetrics,
    PreflightChecks,
    StepContext,
    register_objective,
)

# JS is >= 0; the reference sums of p·log(p/m) may land a few ulps below zero. Values above
# -JS_ROUNDOFF are logged as 0; anything lower means its inputs were not finite (the reference
# masks NaN probabilities to 0, which can leave a negative sum instead of a NaN).
JS_ROUNDOFF = 1e-5


@register_objective
class SaraObjective(Objective):
    """SARA (`sara.objective: sara`), settings in the `sara:` section."""

    name = "sara"
    section = "sara"

    def __init__(self, loss: SaraRoutingLoss, online_priors: bool):
        """Args:
            loss: The router observer computing the term.
            online_priors: Whether the priors come from an anchor forward in each step.
        """
        self.loss = loss
        self.online_priors = online_priors

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.sara.priors == "online" and cfg.data.prior_store:
            raise ValueError("sara.priors online takes its priors from the anchor forward: "
                             "leave data.prior_store unset")
        if cfg.sara.priors == "online" and cfg.data.mock:
            raise ValueError("sara.priors online needs the anchor rows of real shards; "
                             "data.mock has none")

    @classmethod
    def preflight(cls, cfg, checks: PreflightChecks):
        if not _has_priors(cfg) and cfg.sara.lambda_js > 0:
            checks.problems.append("sara.lambda_js > 0 needs data.prior_store (the anchor "
                                   "priors), or data.mock")
        return None

    @classmethod
    def builds_term(cls, cfg) -> bool:
        return _has_priors(cfg)

    @classmethod
    def needs_anchor_rows(cls, cfg) -> bool:
        return cfg.sara.priors == "online"

    @classmethod
    def checkpoint_record(cls, cfg, plan) -> dict:
        built = plan.sara_term
        return {"lambda_js": cfg.sara.lambda_js if built else 0.0,
                "alignment_layers": list(plan.alignment_layers) if built else []}

    @classmethod
    def build(cls, cfg, plan, chunks, model_config, process_groups) -> "SaraObjective":
        loss = SaraRoutingLoss(
            plan.alignment_layers, cfg.sara.lambda_js,
            sequence_parallel=model_config.sequence_parallel, impl=cfg.sara.impl,
            divergence=cfg.sara.divergence, process_groups=process_groups,
        )
        return cls(loss, cfg.sara.priors == "online")

    def router_observer(self):
        return self.loss

    def prepare_step(self, step: StepContext) -> list:
        """The step's online priors on each micro-batch (an anchor forward without gradient),
        and the term's weight T / V (loss tokens over sequences of the global batch)."""
        microbatches = step.microbatches
        if self.online_priors:
            from sara_megatron.sara.online_priors import online_anchor_priors

            priors = online_anchor_priors(step.chunks, microbatches, step.plan.alignment_layers,
                                          step.plan.arch.num_experts, step.device,
                                          process_groups=step.process_groups)
            microbatches = [dataclasses.replace(mb, priors=p)
                            for mb, p in zip(microbatches, priors)]
        self.loss.sequence_weight = float(step.loss_tokens / step.sequences.clamp_min(1))
        self.loss.reset_stats()
        return microbatches

    def set_micro_batch(self, mb, inputs, padding_mask) -> None:
        self.loss.set_batch(mb.priors, inputs.segment_ids, packed=inputs.packed)

    def metrics(self, num_layers: int) -> ObjectiveMetrics:
        """`js`: the mean over aligned layers; per layer, each layer's mean over sequences."""
        layers = self.loss.reduced_layer_means(num_layers)
        layers = {layer: 0.0 if -JS_ROUNDOFF < v < 0 else v for layer, v in layers.items()}
        return ObjectiveMetrics({"js": sum(layers.values()) / len(layers) if layers else 0.0},
                                layers)


def _has_priors(cfg) -> bool:
    return bool(cfg.data.prior_store or cfg.data.mock or cfg.sara.priors == "online")
