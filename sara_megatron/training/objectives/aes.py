"""The AES baseline as a training objective: − w_var·Var(routing scores) + w_orth·L_orth on every
MoE layer (`sara.aes.AesLoss`, Guo et al., 2025), settings in the `aes:` section.

Unset coefficients are calibrated before the first step by a forward pass over its global batch
that attaches nothing (`prepare_step`); the orthogonality term reads the experts' outputs in the
allgather token dispatcher's token order, so preflight refuses any other dispatcher.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from sara_megatron.routing import observe_routers
from sara_megatron.training.objectives.base import (
    Objective,
    ObjectiveMetrics,
    PreflightChecks,
    StepContext,
    register_objective,
)

log = logging.getLogger(__name__)


@register_objective
class AesObjective(Objective):
    """AES (`sara.objective: aes`)."""

    name = "aes"
    section = "aes"

    def __init__(self, loss, num_layers: int):
        """Args:
            loss: The `sara.aes.AesLoss`, its experts hooks attached.
            num_layers: The model's layer count (the authors' calibration reads the first).
        """
        self.loss = loss
        self.num_layers = num_layers

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse a prior store (AES reads no priors).

        Args:
            cfg: The `TrainConfig` being loaded.

        Raises:
            ValueError: data.prior_store is set.
        """
        if cfg.data.prior_store:
            raise ValueError("sara.objective aes reads no anchor priors: leave data.prior_store "
                             "unset")

    @classmethod
    def preflight(cls, cfg, checks: PreflightChecks):
        """Refuse a token dispatcher other than allgather (the GPU default is alltoall).

        Args:
            cfg: The run's `TrainConfig`.
            checks: Where the problem goes.

        Returns:
            None: the build reads the config only.
        """
        dispatcher = cfg.model.token_dispatcher or ("alltoall" if torch.cuda.is_available()
                                                    else "allgather")
        if dispatcher != "allgather":
            checks.problems.append(
                f"sara.objective aes with the {dispatcher} token dispatcher is not supported "
                "(its orthogonality term reads the allgather dispatcher's tokens): set "
                "model.token_dispatcher: allgather")
        return None

    @classmethod
    def build(cls, cfg, plan, chunks, model_config, process_groups) -> "AesObjective":
        """The AES loss, its orthogonality hooks on every MoE layer of `chunks`.

        Args:
            cfg: The run's `TrainConfig`.
            plan: Its `RunPlan`.
            chunks: This rank's bare model chunks.
            model_config: megatron's TransformerConfig (unused).
            process_groups: Megatron's groups; None is one process alone.

        Returns:
            The objective.
        """
        from sara_megatron.sara.aes import AesLoss

        a = cfg.aes
        loss = AesLoss(a.variance_coeff, a.orthogonality_coeff, a.variance_target,
                       a.orthogonality_target, calibration=a.calibration,
                       process_groups=process_groups)
        loss.attach(chunks)
        return cls(loss, plan.arch.num_layers)

    def router_observer(self):
        """The AES loss, whose variance term rides on every router."""
        return self.loss

    def prepare_step(self, step: StepContext) -> list:
        """Calibrate unset coefficients on this (the first) global batch with a forward pass
        that attaches nothing, then set the step's token weight T / N (see sara.aes).

        Args:
            step: The step.

        Returns:
            The micro-batches, unchanged.
        """
        aes = self.loss
        if not aes.calibrated:
            aes.reset_stats()
            with torch.no_grad(), observe_routers(step.chunks, aes):
                step.run_forward_only()
            ways = aes.calibrate(self.num_layers)
            if dist.get_rank() == 0:
                for way, v in ways.items():  # both candidates, whichever is used
                    log.info("AES calibration %s%s: variance %.4g -> aes.variance_coeff=%g, "
                             "orthogonality %.4g -> aes.orthogonality_coeff=%g", way,
                             " (used)" if way == aes.calibration else "", v["variance"],
                             v["variance_coeff"], v["orthogonality"], v["orthogonality_coeff"])
                log.info("AES coefficients calibrated: aes.variance_coeff=%g "
                         "aes.orthogonality_coeff=%g (set them to resume exactly)",
                         aes.variance_coeff, aes.orthogonality_coeff)
        aes.reset_stats()
        aes.token_weight = float(step.loss_tokens / step.tokens.clamp_min(1))
        return step.microbatches

    def metrics(self, num_layers: int) -> ObjectiveMetrics:
        """Both terms over the step's tokens (collective).

        Args:
            num_layers: The model's layer count (unused: the loss knows its layers).

        Returns:
            terms `aes_variance`, `aes_orthogonality`: each term's token mean, averaged over
            layers.
        """
        means = self.loss.reduced_layer_means()
        return ObjectiveMetrics({f"aes_{name}": sum(v.values()) / max(len(v), 1)
                                 for name, v in means.items()})
