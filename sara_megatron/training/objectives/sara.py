"""SARA's term as a training objective: λ_JS · D(anchor ‖ target routing) on the aligned layers.

The term itself is `sara.loss.SaraRoutingLoss`, a router observer. Its priors come with each
micro-batch: read from the prior store by the loader, or (`sara.priors: online`) from the anchor
forward this objective runs before the step (`sara.online_priors`). λ_JS = 0 runs the very same
code (the FFT baseline); without priors at λ_JS = 0 no term is built at all.
"""

from __future__ import annotations

import contextlib
import dataclasses

from sara_megatron.peft import adapters_disabled
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

    def __init__(self, loss: SaraRoutingLoss, online_priors: bool, base_priors: bool = False):
        """Args:
            loss: The router observer computing the term.
            online_priors: Whether the priors come from an anchor forward in each step.
            base_priors: Run that anchor forward with every LoRA adapter switched off (the base
                model's routing; `peft.online_priors: base`).
        """
        self.loss = loss
        self.online_priors = online_priors
        self.base_priors = base_priors

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse online priors beside a prior store or mock data.

        Args:
            cfg: The `TrainConfig` being loaded.

        Raises:
            ValueError: Naming the setting to change.
        """
        if cfg.sara.priors == "online" and cfg.data.prior_store:
            raise ValueError("sara.priors online takes its priors from the anchor forward: "
                             "leave data.prior_store unset")
        if cfg.sara.priors == "online" and cfg.data.mock:
            raise ValueError("sara.priors online needs the anchor rows of real shards; "
                             "data.mock has none")

    @classmethod
    def preflight(cls, cfg, checks: PreflightChecks):
        """Refuse λ_JS > 0 without priors to read.

        Args:
            cfg: The run's `TrainConfig`.
            checks: Where the problem goes.

        Returns:
            None: the build reads the plan's aligned layers only.
        """
        if not _has_priors(cfg) and cfg.sara.lambda_js > 0:
            checks.problems.append("sara.lambda_js > 0 needs data.prior_store (the anchor "
                                   "priors), or data.mock")
        return None

    @classmethod
    def builds_term(cls, cfg) -> bool:
        """Whether there are priors to read (store, mock or online).

        Args:
            cfg: The run's `TrainConfig`.
        """
        return _has_priors(cfg)

    @classmethod
    def needs_anchor_rows(cls, cfg) -> bool:
        """Whether the priors come from the anchor forward (`sara.priors: online`).

        Args:
            cfg: The run's `TrainConfig`.
        """
        return cfg.sara.priors == "online"

    @classmethod
    def checkpoint_record(cls, cfg, plan) -> dict:
        """λ_JS and the aligned layers (0 and none when no term is built).

        Args:
            cfg: The run's `TrainConfig`.
            plan: Its `RunPlan`.

        Returns:
            {"lambda_js": float, "alignment_layers": list[int]}.
        """
        built = plan.sara_term
        return {"lambda_js": cfg.sara.lambda_js if built else 0.0,
                "alignment_layers": list(plan.alignment_layers) if built else []}

    @classmethod
    def build(cls, cfg, plan, chunks, model_config, process_groups) -> "SaraObjective":
        """The SARA term on the plan's aligned layers (a router observer: nothing to attach).

        Args:
            cfg: The run's `TrainConfig`.
            plan: Its `RunPlan`.
            chunks: This rank's bare model chunks.
            model_config: megatron's TransformerConfig (sequence parallel or not).
            process_groups: Megatron's groups; None is one process alone.

        Returns:
            The objective.
        """
        loss = SaraRoutingLoss(
            plan.alignment_layers, cfg.sara.lambda_js,
            sequence_parallel=model_config.sequence_parallel, impl=cfg.sara.impl,
            divergence=cfg.sara.divergence, process_groups=process_groups,
        )
        return cls(loss, cfg.sara.priors == "online",
                   base_priors=cfg.peft.lora and cfg.peft.online_priors == "base")

    def router_observer(self):
        """The SARA loss, which attaches its term on the aligned routers."""
        return self.loss

    def prepare_step(self, step: StepContext) -> list:
        """The step's online priors on each micro-batch (an anchor forward without gradient),
        and the term's weight T / V (loss tokens over sequences of the global batch).

        Args:
            step: The step.

        Returns:
            The micro-batches, with their online priors when `sara.priors: online`.
        """
        microbatches = step.microbatches
        if self.online_priors:
            from sara_megatron.sara.online_priors import online_anchor_priors

            with (adapters_disabled(step.chunks) if self.base_priors
                  else contextlib.nullcontext()):
                priors = online_anchor_priors(step.chunks, microbatches,
                                              step.plan.alignment_layers,
                                              step.plan.arch.num_experts, step.device,
                                              process_groups=step.process_groups)
            microbatches = [dataclasses.replace(mb, priors=p)
                            for mb, p in zip(microbatches, priors)]
        self.loss.sequence_weight = float(step.loss_tokens / step.sequences.clamp_min(1))
        self.loss.reset_stats()
        return microbatches

    def set_micro_batch(self, mb, inputs, padding_mask) -> None:
        """Hand the loss the micro-batch's priors and segment ids.

        Args:
            mb: The `SaraMicroBatch`.
            inputs: Its `ModelInputs` on this CP rank.
            padding_mask: [B, S_cp] bool, True = padding (unused: the segment ids say it).
        """
        self.loss.set_batch(mb.priors, inputs.segment_ids, packed=inputs.packed)

    def metrics(self, num_layers: int) -> ObjectiveMetrics:
        """The divergence over the step's sequences (collective).

        Args:
            num_layers: The model's layer count.

        Returns:
            terms {"js": the mean over aligned layers}; per layer, each layer's mean over
            sequences (a few ulps below 0 read as 0).
        """
        layers = self.loss.reduced_layer_means(num_layers)
        layers = {layer: 0.0 if -JS_ROUNDOFF < v < 0 else v for layer, v in layers.items()}
        return ObjectiveMetrics({"js": sum(layers.values()) / len(layers) if layers else 0.0},
                                layers)


def _has_priors(cfg) -> bool:
    return bool(cfg.data.prior_store or cfg.data.mock or cfg.sara.priors == "online")
