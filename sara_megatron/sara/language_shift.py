"""ShifCon's shift outside training: what a ShifCon run's checkpoints and exports carry, and the
hooks that shift a model's hidden states for one language at inference.

A ShifCon model is trained with non-anchor hidden states shifted entering layer a and shifted
back entering layer b (docs/objectives.md), so every checkpoint and HF export of a ShifCon run
carries the shift: `shifcon.json` (format, layers, anchor, normalisation, the vectors' path and
sha256, checked on load) and `shifcon/language_vectors.safetensors` (in a subfolder, so that a
server globbing `*.safetensors` does not take the vectors for weights). `shifted(layers, shift,
language)` adds the training shift to megatron's or transformers' decoder layers; under a KV
cache each new token gets the shift as it enters the layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Iterator, Mapping, Optional

import torch

from sara_megatron.tool_errors import UserFacingError

SIDECAR_FILE = "shifcon.json"
VECTORS_FILE = os.path.join("shifcon", "language_vectors.safetensors")
SIDECAR_FORMAT = "sara-shifcon-shift-1"


class ShiftSidecarError(UserFacingError, ValueError):
    """A `shifcon.json` that cannot be read, or whose vectors do not match it."""


@dataclasses.dataclass(frozen=True)
class LanguageShift:
    """A ShifCon run's shift: its language vectors and the two layers (global, 0-based).

    Attributes:
        vectors: the `sara.shifcon_vectors.LanguageVectors` the run shifted with (its last update).
        shift_layer: a; the shift is added to the hidden states entering it.
        shift_back_layer: b; the shift is taken back entering it.
        normalisation: how the vectors were computed, as their file records it (None: not
            recorded, i.e. the raw token means of files written before it was).
    """

    vectors: object
    shift_layer: int
    shift_back_layer: int
    normalisation: Optional[str] = None

    @property
    def anchor_language(self) -> str:
        """The language whose hidden states are not shifted (the vectors' anchor)."""
        return self.vectors.anchor_language

    @property
    def languages(self) -> list[str]:
        """The languages the vectors hold, sorted."""
        return sorted(self.vectors.vectors)

    def delta(self, language: str, layer: int) -> torch.Tensor:
        """The shift of `language` at `layer`: v_anchor[layer] − v_language[layer].

        Args:
            language: the input's language.
            layer: global 0-based layer index.

        Returns:
            [H] fp32 tensor; zeros for the anchor language.

        Raises:
            KeyError: no vector for `language` or `layer`.
        """
        anchor = self.vectors.at(self.anchor_language, layer)
        if language == self.anchor_language:
            return torch.zeros_like(anchor)
        return anchor - self.vectors.at(language, layer)

    def describe(self) -> str:
        """A one-line description of the shift (layers, anchor, languages) for logs."""
        return (f"ShifCon shift entering layer {self.shift_layer}, back entering layer "
                f"{self.shift_back_layer}, anchor {self.anchor_language}, vectors of "
                f"{', '.join(self.languages)}")


def objective_shift(objective) -> LanguageShift:
    """The shift a `sara.shifcon.ShifconObjective` trains with, its vectors as they are now.

    Args:
        objective: the ShifCon objective of a run.
    """
    return LanguageShift(objective.vectors, objective.shift_layer, objective.shift_back_layer,
                         getattr(objective.vectors, "normalisation", None))


def write_shift_sidecar(folder: str | os.PathLike, shift: LanguageShift) -> None:
    """Write `shifcon.json` and the vectors into `folder` (a checkpoint's staging folder or an
    HF export being built; not atomic on its own: the caller publishes the folder).

    Args:
        folder: the folder to write into (`shifcon/` is created in it).
        shift: the shift to record.
    """
    from sara_megatron.io import sha256_file
    from sara_megatron.sara.shifcon_vectors import save_language_vectors

    folder = os.fspath(folder)
    vectors_path = os.path.join(folder, VECTORS_FILE)
    os.makedirs(os.path.dirname(vectors_path), exist_ok=True)
    save_language_vectors(vectors_path, shift.vectors)
    record = {"format": SIDECAR_FORMAT, "shift_layer": shift.shift_layer,
              "shift_back_layer": shift.shift_back_layer,
              "anchor_language": shift.anchor_language, "normalisation": shift.normalisation,
              "languages": shift.languages, "vectors": VECTORS_FILE.replace(os.sep, "/"),
              "vectors_sha256": sha256_file(vectors_path)}
    with open(os.path.join(folder, SIDECAR_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def has_shift_sidecar(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a `shifcon.json` (not checked; see `read_shift_sidecar`).

    Args:
        folder: a checkpoint or HF folder.
    """
    return os.path.isfile(os.path.join(os.fspath(folder), SIDECAR_FILE))


def read_shift_sidecar(folder: str | os.PathLike) -> Optional[LanguageShift]:
    """The shift a checkpoint or HF folder carries; None when it carries none.

    Args:
        folder: a checkpoint or HF folder.

    Raises:
        ShiftSidecarError: another format, a missing vectors file or one whose sha256, layers or
            anchor differ from what `shifcon.json` records.
    """
    from sara_megatron.io import sha256_file
    from sara_megatron.sara.shifcon_vectors import load_language_vectors

    folder = os.fspath(folder)
    path = os.path.join(folder, SIDECAR_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShiftSidecarError(f"{path}: cannot be read ({err})") from None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise ShiftSidecarError(f"{path}: not a {SIDECAR_FORMAT} file")
    vectors_path = os.path.join(folder, record.get("vectors") or VECTORS_FILE)
    if not os.path.isfile(vectors_path):
        raise ShiftSidecarError(f"{path} names {vectors_path}, which is missing: copy the "
                                "shifcon/ folder with it")
    if sha256_file(vectors_path) != record.get("vectors_sha256"):
        raise ShiftSidecarError(f"{vectors_path} is not the file {path} records (sha256 "
                                "differs): the language vectors were altered or replaced")
    try:
        vectors = load_language_vectors(vectors_path)
        a, b = int(record["shift_layer"]), int(record["shift_back_layer"])
    except (KeyError, TypeError, ValueError) as err:
        raise ShiftSidecarError(f"{path}: {err}") from None
    if a not in vectors.layers or b not in vectors.layers:
        raise ShiftSidecarError(f"{path}: layers {a}, {b} but the vectors hold "
                                f"{list(vectors.layers)}")
    if vectors.anchor_language != record.get("anchor_language"):
        raise ShiftSidecarError(f"{path}: anchor {record.get('anchor_language')!r}, the vectors' "
                                f"is {vectors.anchor_language!r}")
    return LanguageShift(vectors, a, b, record.get("normalisation"))


def copy_shift_sidecar(source: str | os.PathLike, destination: str | os.PathLike) -> bool:
    """Copy a checkpoint's shift (checked first) into `destination`.

    Args:
        source: the checkpoint or HF folder that may carry a shift.
        destination: the folder to copy `shifcon.json` and `shifcon/` into.

    Returns:
        Whether a shift was copied (False when `source` has none).

    Raises:
        ShiftSidecarError: the source's shift does not read back (see `read_shift_sidecar`).
    """
    if read_shift_sidecar(source) is None:
        return False
    source, destination = os.fspath(source), os.fspath(destination)
    os.makedirs(os.path.join(destination, os.path.dirname(VECTORS_FILE)), exist_ok=True)
    for name in (SIDECAR_FILE, VECTORS_FILE):
        shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    return True


def _add_to_hidden(args, kwargs, delta: torch.Tensor):
    if "hidden_states" in kwargs:
        hidden = kwargs["hidden_states"]
        return args, dict(kwargs, hidden_states=hidden + delta.to(hidden.device, hidden.dtype))
    hidden = args[0]
    return (hidden + delta.to(hidden.device, hidden.dtype), *args[1:]), kwargs


@contextlib.contextmanager
def shifted(layers: Mapping[int, torch.nn.Module], shift: Optional[LanguageShift],
            language: Optional[str]) -> Iterator[None]:
    """Within the block, the hidden states entering `layers[a]` move by v_anchor[a] − v_lang[a]
    and those entering `layers[b]` by −(v_anchor[b] − v_lang[b]), as in ShifCon training.

    Args:
        layers: {global 0-based layer: decoder layer module} of the model (the layers this
            process holds; a layer it does not hold is not hooked).
        shift: the run's shift; None: nothing is done.
        language: the input's language; the anchor language (or None) is not shifted.

    Raises:
        KeyError: a language the vectors do not hold (named).
    """
    if shift is None or language is None or language == shift.anchor_language:
        yield
        return
    if language not in shift.vectors.vectors:
        raise KeyError(f"the ShifCon shift holds vectors of {', '.join(shift.languages)}, not "
                       f"{language!r}")
    handles = []
    try:
        for layer, sign in ((shift.shift_layer, 1.0), (shift.shift_back_layer, -1.0)):
            if layer in layers:
                delta = sign * shift.delta(language, layer)
                handles.append(layers[layer].register_forward_pre_hook(
                    lambda module, args, kwargs, d=delta: _add_to_hidden(args, kwargs, d),
                    with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_decoder_layers(lm) -> dict[int, torch.nn.Module]:
    """The decoder layers of a transformers causal LM (Qwen3-MoE, PhiMoE, ...).

    Args:
        lm: the loaded model.

    Returns:
        {0-based layer: decoder layer module}.

    Raises:
        ValueError: no decoder layers found.
    """
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", lm)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__}: no decoder layers found to shift")
    return dict(enumerate(layers))


def check_shift_fits(shift: LanguageShift, num_layers: int, where: str) -> None:
    """Refuse a shift whose layers the model does not have.

    Args:
        shift: the shift to apply.
        num_layers: the model's layer count.
        where: the folder the shift came from, for the message.

    Raises:
        ShiftSidecarError: the shift-back layer is past the model's last layer.
    """
    if shift.shift_back_layer >= num_layers:
        raise ShiftSidecarError(f"{where}: the ShifCon shift goes back entering layer "
                                f"{shift.shift_back_layer}, but the model has {num_layers} layers")
