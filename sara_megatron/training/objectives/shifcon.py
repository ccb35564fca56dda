"""The ShifCon baseline as a training objective (`sara.shifcon.ShifconObjective`: shift, contrast,
shift back; Zhang et al., 2025), settings in the `shifcon:` section.

The anchor side (`shifcon.anchor_gradient`): trained, each micro-batch carries its anchor rows
(`objective_inputs["shifcon"]`) and goes forward with gradient just before the micro-batch's own
forward; constant, the anchor rows of the whole step go forward without gradient before the step
and each micro-batch carries its contrastive targets (the pooled anchors gathered over data
parallel, and where this rank's samples start among them). Neither forward is shifted. The
cross-entropy is weighted by `shifcon.ce_weight` (`ce_weight`). With `shifcon.online_vectors`
the language vectors are updated before each step (sara/shifcon_online.py) and travel with every
checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from sara_megatron.training.objectives.base import (
    Objective,
    ObjectiveMetrics,
    PreflightChecks,
    StepContext,
    register_objective,
)


@register_objective
class ShifconTrainingObjective(Objective):
    """ShifCon (`sara.objective: shifcon`)."""

    name = "shifcon"
    section = "shifcon"

    def __init__(self, term, process_groups, chunks, ce_weight: float):
        """Args:
            term: The `sara.shifcon.ShifconObjective`, its hooks attached.
            process_groups: Megatron's groups; None is one process alone.
            chunks: This rank's bare model chunks (the trained anchor forward runs the one).
            ce_weight: The cross-entropy's weight in the loss.
        """
        self.term = term
        self.process_groups = process_groups
        self.chunks = chunks
        self.ce_weight = ce_weight
        self.online = None  # sara.shifcon_online.OnlineVectors with shifcon.online_vectors

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse missing settings, layers out of order, priors or mock data.

        Args:
            cfg: The `TrainConfig` being loaded.

        Raises:
            ValueError: Naming the settings to change.
        """
        s = cfg.shifcon
        missing = [k for k in ("language_vectors", "shift_layer", "shift_back_layer")
                   if getattr(s, k) is None]
        if missing:
            raise ValueError(f"sara.objective shifcon needs "
                             f"{', '.join('shifcon.' + k for k in missing)}")
        if s.shift_layer >= s.shift_back_layer:
            raise ValueError(f"shifcon.shift_layer ({s.shift_layer}) must come before "
                             f"shifcon.shift_back_layer ({s.shift_back_layer})")
        if cfg.data.prior_store or cfg.data.mock:
            raise ValueError("sara.objective shifcon reads no anchor priors and needs real "
                             "shards: leave data.prior_store unset and data.mock false")
        if s.anchor_gradient and (cfg.parallel.pp > 1 or cfg.parallel.vpp):
            raise ValueError("shifcon.anchor_gradient with pipeline parallelism is not built: "
                             "set shifcon.anchor_gradient=false or parallel.pp=1")

    @classmethod
    def check_paths(cls, cfg, need) -> None:
        """The language-vector file.

        Args:
            cfg: The run's `TrainConfig`.
            need: Preflight's check of one path.
        """
        need("shifcon.language_vectors", cfg.shifcon.language_vectors,
             "as tools/extract_language_vectors.py writes it", folder=False)

    @classmethod
    def preflight(cls, cfg, checks: PreflightChecks):
        """Load the language vectors and check them: of the starting model, within its layers,
        keyed by the shards' anchor and covering every training language.

        Args:
            cfg: The run's `TrainConfig`.
            checks: The architecture and training samples, and where the problems go.

        Returns:
            The `LanguageVectors`, or None when they could not be read.
        """
        if checks.arch is None or "shifcon.language_vectors" in checks.bad_paths:
            return None
        from sara_megatron.sara.shifcon_vectors import load_language_vectors

        s, problems = cfg.shifcon, checks.problems
        if s.shift_back_layer >= checks.arch.num_layers:
            problems.append(f"shifcon.shift_back_layer {s.shift_back_layer} is past the model's "
                            f"{checks.arch.num_layers} layers")
        vectors = checks.attempt(lambda: load_language_vectors(s.language_vectors))
        if vectors is None:
            return None
        if cfg.model.checkpoint and "model.checkpoint" not in checks.bad_paths:
            from sara_megatron.priors import prior_anchor_fingerprints

            accepted = prior_anchor_fingerprints(cfg.model.checkpoint, vectors.model_fingerprint)
            if vectors.model_fingerprint not in accepted:
                problems.append(f"language vectors {s.language_vectors} come from another model "
                                f"({vectors.model_fingerprint}) than model.checkpoint "
                                f"{cfg.model.checkpoint}")
        dataset = checks.dataset
        if dataset is not None:
            if vectors.anchor_language != dataset.shards.anchor_language:
                problems.append(f"language vectors {s.language_vectors} are "
                                f"{vectors.anchor_language!r}-anchored, the shards anchor on "
                                f"{dataset.shards.anchor_language!r}")
            missing = [lang for lang in dataset.languages if lang not in vectors.vectors]
            if missing:
                problems.append(f"language vectors {s.language_vectors} have no vector for "
                                f"{missing}")
        return vectors

    @classmethod
    def needs_anchor_rows(cls, cfg) -> bool:
        """Whether anchor rows are needed: always, the contrastive targets come from them.

        Args:
            cfg: The run's `TrainConfig`.
        """
        return True

    @classmethod
    def build(cls, cfg, plan, chunks, model_config, process_groups) -> "ShifconTrainingObjective":
        """The shift / shift-back hooks on layers a and b of `chunks` and the contrastive term.

        Args:
            cfg: The run's `TrainConfig`.
            plan: Its `RunPlan` (`objective_inputs`: the language vectors).
            chunks: This rank's bare model chunks.
            model_config: megatron's TransformerConfig (unused).
            process_groups: Megatron's groups; None is one process alone.

        Returns:
            The objective.
        """
        from sara_megatron.sara.shifcon import ShifconObjective

        s = cfg.shifcon
        term = ShifconObjective(plan.objective_inputs, s.shift_layer, s.shift_back_layer,
                                s.contrastive_coeff, s.temperature, process_groups=process_groups,
                                symmetric=s.symmetric, anchor_gradient=s.anchor_gradient,
                                contrast_layers=s.contrast_layers)
        term.attach(chunks)
        objective = cls(term, process_groups, list(chunks), s.ce_weight)
        if s.online_vectors:
            from sara_megatron.sara.shifcon_online import OnlineVectors

            objective.online = OnlineVectors.start(plan.objective_inputs,
                                                   (s.shift_layer, s.shift_back_layer))
        return objective

    def prepare_step(self, step: StepContext) -> list:
        """Each micro-batch gets its anchor side: its anchor rows (trained anchors, forwarded in
        `set_micro_batch`) or its contrastive targets from the step's anchor forward (no
        gradient, no shift). The term's weight is T / C (C: contrasted sequences of the global
        batch; anchor-language samples are in the batch but not in the term).

        Args:
            step: The step.

        Returns:
            The micro-batches, each with `objective_inputs["shifcon"]`.
        """
        from sara_megatron.sara.online_priors import anchor_row_count, anchor_rows_view

        term = self.term
        if self.online is not None:
            from sara_megatron.sara.shifcon_online import step_sentence_sums

            sums, counts = step_sentence_sums(term, step.chunks, step.microbatches, step.device,
                                              self.online.languages)
            self.online.add(sums, counts)
            term.vectors = self.online.vectors()  # this step shifts by them already
        if term.anchor_gradient:
            rows = anchor_row_count(step.microbatches, step.device)  # one shape on every rank
            entries = [anchor_rows_view(mb, rows) for mb in step.microbatches]
        else:
            entries = term.anchor_features(step.chunks, step.microbatches, step.device)
        microbatches = [dataclasses.replace(mb, objective_inputs={**mb.objective_inputs,
                                                                  self.name: entry})
                        for mb, entry in zip(step.microbatches, entries)]
        contrasted = torch.tensor([float(term.contrasted_in(microbatches))],
                                  dtype=torch.float64, device=step.device)
        if self.process_groups is not None:
            dist.all_reduce(contrasted, group=self.process_groups.dp)
        term.sequence_weight = float(step.loss_tokens / contrasted.clamp_min(1))
        term.reset_stats()
        return microbatches

    def set_micro_batch(self, mb, inputs, padding_mask) -> None:
        """Hand the term the micro-batch's languages, segments and contrastive targets (trained
        anchors: their forward, with gradient, runs here).

        Args:
            mb: The `SaraMicroBatch`, with `objective_inputs["shifcon"]`.
            inputs: Its `ModelInputs` on this CP rank.
            padding_mask: [B, S_cp] bool, True = padding.
        """
        from sara_megatron.sara.online_priors import AnchorRowsView

        entry = mb.objective_inputs.get(self.name)
        if isinstance(entry, AnchorRowsView):
            (chunk,) = self.chunks  # no pipeline parallelism (check_config)
            entry = self.term.anchor_features_with_grad(chunk, entry, padding_mask.device)
        # (the pooled anchors per contrast layer over data parallel, where this rank's samples
        # start); None on a stage without the contrast layers: shift only
        anchors, offset = entry if entry is not None else (None, 0)
        self.term.set_batch(mb.languages, padding_mask, anchors, offset,
                            segment_ids=inputs.segment_ids if inputs.packed else None)

    def metrics(self, num_layers: int) -> ObjectiveMetrics:
        """The contrastive term over the step's contrasted sequences (collective).

        Args:
            num_layers: The model's layer count (unused).

        Returns:
            terms {"shifcon_contrastive": the mean InfoNCE term}.
        """
        return ObjectiveMetrics({"shifcon_contrastive": self.term.reduced_mean()})

    def write_checkpoint_files(self, folder: str) -> None:
        """The shift (`shifcon.json` and the vectors as the run uses them): the export carries
        it, and evaluation and the divergence analysis apply it (sara.language_shift).

        Args:
            folder: The checkpoint's staging folder.
        """
        from sara_megatron.sara.language_shift import objective_shift, write_shift_sidecar

        write_shift_sidecar(folder, objective_shift(self.term))
        if self.online is not None:
            self.online.save(folder)

    def load_checkpoint_files(self, folder: str) -> None:
        """Continue the online vectors' running means from the resumed checkpoint.

        Args:
            folder: The checkpoint folder being resumed.
        """
        if self.online is not None and self.online.load(folder):
            self.term.vectors = self.online.vectors()
