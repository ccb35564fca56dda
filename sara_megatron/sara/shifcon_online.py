"""ShifCon's language vectors updated during training (`shifcon.online_vectors`), the released
rule: each step, per language, the mean over the step's samples of their L2-normalised mean hidden
states entering layers a and b, from a forward without shift and without gradient of the step's
own samples (non-anchor languages) and of their anchor rows (the anchor language); a language's
vector is the running mean of its step means, and the shift of the step uses the vectors with that
step's mean already in (rattlesnakey/ShifCon 516364a, `src/finetune_contrast.py`: the contrastive
forward updates the accumulators before the generation forward; docs/objectives.md).

A language not seen yet keeps the offline file's vector. The running sums and counts travel with
each checkpoint (`shifcon/online_vectors.safetensors`) and a resume continues them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sara_megatron.sara.shifcon_vectors import LanguageVectors

FORMAT = "sara-shifcon-online-vectors-1"
STATE_FILE = os.path.join("shifcon", "online_vectors.safetensors")


@dataclasses.dataclass
class OnlineVectors:
    """The running sums of the step means, per language (rows: layers a and b).

    Attributes:
        initial: The offline vectors (their layers, anchor, model; a language's own until its
            first step mean).
        sums: [n_lang, 2, H] fp64, the sum of each language's step means, languages in
            `languages` order.
        counts: [n_lang] int64, the number of step means summed.
    """

    initial: LanguageVectors
    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def start(cls, initial: LanguageVectors, layers: tuple[int, int]) -> "OnlineVectors":
        """Nothing summed yet.

        Args:
            initial: The offline vectors, holding `layers`.
            layers: (a, b), the shift and shift-back layers.

        Returns:
            The state, its initial vectors cut to rows a and b.
        """
        if tuple(initial.layers) != tuple(layers):
            initial = LanguageVectors(tuple(layers), {
                lang: torch.stack([initial.at(lang, layer) for layer in layers])
                for lang in initial.vectors}, initial.anchor_language, initial.model_fingerprint,
                initial.tokens, initial.normalisation)
        hidden = next(iter(initial.vectors.values())).shape[-1]
        n = len(initial.vectors)
        return cls(initial, torch.zeros(n, 2, hidden, dtype=torch.float64),
                   torch.zeros(n, dtype=torch.int64))

    @property
    def languages(self) -> list[str]:
        """The languages in row order (the offline file's, sorted)."""
        return sorted(self.initial.vectors)

    def add(self, step_sums: torch.Tensor, step_counts: torch.Tensor) -> None:
        """Take one step: each language with samples adds its step mean.

        Args:
            step_sums: [n_lang, 2, H] the sums of the step's normalised sentence states.
            step_counts: [n_lang] the samples summed per language.
        """
        seen = step_counts > 0
        means = step_sums.double() / step_counts.clamp_min(1).double()[:, None, None]
        self.sums[seen] += means[seen].cpu()
        self.counts[seen] += 1

    def vectors(self) -> LanguageVectors:
        """The vectors the shift uses now: running means, the offline vector where none yet."""
        out = {}
        for i, lang in enumerate(self.languages):
            if int(self.counts[i]) > 0:
                out[lang] = (self.sums[i] / int(self.counts[i])).float()
            else:
                out[lang] = self.initial.vectors[lang]
        tokens = {lang: int(self.counts[i]) for i, lang in enumerate(self.languages)}
        return LanguageVectors(self.initial.layers, out, self.initial.anchor_language,
                               self.initial.model_fingerprint, tokens, "sentence_l2")

    def save(self, folder: str) -> None:
        """Write the running sums into a checkpoint's staging folder.

        Args:
            folder: The folder (`shifcon/` is created in it).
        """
        from safetensors.torch import save_file

        path = os.path.join(folder, STATE_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"sums": self.sums.contiguous(), "counts": self.counts.contiguous()}, path,
                  metadata={"format": FORMAT, "languages": json.dumps(self.languages),
                            "layers": json.dumps(list(self.initial.layers))})

    def load(self, folder: str) -> bool:
        """Continue the running sums a checkpoint holds.

        Args:
            folder: A checkpoint folder.

        Returns:
            Whether it held them (a checkpoint of a run without online vectors does not).

        Raises:
            ValueError: They are of other languages or layers than this run's.
        """
        from safetensors import safe_open

        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            return False
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a ShifCon online-vector state ({FORMAT})")
            languages, layers = json.loads(meta["languages"]), json.loads(meta["layers"])
            if languages != self.languages or tuple(layers) != tuple(self.initial.layers):
                raise ValueError(f"{path} holds languages {languages} at layers {layers}; this run "
                                 f"has {self.languages} at {list(self.initial.layers)}")
            self.sums = f.get_tensor("sums")
            self.counts = f.get_tensor("counts")
        return True


def training_rows(mb):
    """A micro-batch's own rows as the forward runner takes them.

    Args:
        mb: A `SaraMicroBatch`.

    Returns:
        Its `ForwardRows` (packed rows with their segment and position ids).
    """
    from sara_megatron.routing.forward_runner import ForwardRows

    packed = mb.segment_ids is not None
    return ForwardRows(mb.tokens, mb.padding_mask, mb.segment_ids, mb.position_ids,
                       packed=packed, samples=len(mb.languages) if packed else 0)


def step_sentence_sums(term, chunks, microbatches, device, languages: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's sums of L2-normalised sentence states entering layers a and b, per language,
    over the whole global batch: the anchor rows for the anchor language, the samples' own rows
    for the others (forwards without shift or gradient; collective over the world).

    Args:
        term: The `sara.shifcon.ShifconObjective` (its hooks record during these forwards).
        chunks: This rank's model chunks.
        microbatches: The step's micro-batches, with anchor rows.
        device: Where the model runs.
        languages: The languages in row order.

    Returns:
        ([n_lang, 2, H] fp64 sums, [n_lang] int64 sample counts), summed over data parallel and
        pipeline stages.
    """
    from sara_megatron.routing.forward_runner import ForwardRunner
    from sara_megatron.sara.online_priors import run_anchor_forward

    layers = (term.shift_layer, term.shift_back_layer)
    hidden = next(iter(term.vectors.vectors.values())).shape[-1]
    sums = torch.zeros(len(languages), 2, hidden, dtype=torch.float64, device=device)
    counts = torch.zeros(len(languages), dtype=torch.int64, device=device)
    row = {lang: i for i, lang in enumerate(languages)}
    anchor = term.anchor_language

    def add(pooled: dict, sample_languages, keep) -> None:
        for slot, layer in enumerate(layers):
            if layer not in pooled:
                continue  # another pipeline stage holds it
            states, tokens = pooled[layer]
            names = sample_languages if sample_languages is not None else [anchor] * len(states)
            for k, lang in enumerate(names):
                if keep(lang) and int(tokens[k]) > 0:
                    sums[row[lang], slot] += F.normalize(states[k].double(), dim=-1)
                    if slot == 0:  # counted once, by the stage of layer a
                        counts[row[lang]] += 1

    recorded: dict[int, dict] = {}

    @contextlib.contextmanager
    def observe_anchors(index, segments, samples):
        with term.recording(samples, segments, recorded.setdefault(index, {}), layers):
            yield

    run_anchor_forward(chunks, microbatches, device, observe_anchors, term.process_groups,
                       stop_after=layers[1])
    for index in range(len(microbatches)):
        add(recorded.get(index, {}), None, lambda lang: True)  # every row an anchor

    recorded.clear()

    @contextlib.contextmanager
    def observe_samples(index, inputs, rows):
        with term.recording(rows.samples, inputs.segment_ids, recorded.setdefault(index, {}),
                            layers):
            yield

    runner = ForwardRunner(chunks, device, term.process_groups)
    runner.run([training_rows(mb) for mb in microbatches], observe_samples, stop_after=layers[1])
    for index, mb in enumerate(microbatches):
        add(recorded.get(index, {}), list(mb.languages), lambda lang: lang != anchor)

    _sum_over_ranks(sums, counts, term.process_groups)
    return sums.cpu(), counts.cpu()


def _sum_over_ranks(sums: torch.Tensor, counts: torch.Tensor, process_groups) -> None:
    """Sum over data parallel, then over pipeline stages (each holds its own layers' rows; the
    counts come from the stage of layer a, the others' are 0)."""
    if process_groups is None or not dist.is_initialized():
        return
    for group in (process_groups.dp, process_groups.pp):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
