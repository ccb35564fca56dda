"""ShifCon's language vectors on disk: one safetensors file, a [layers, H] fp32 tensor per language.

`tools/extract_language_vectors.py` writes it (`sara/shifcon_extraction.py` computes the vectors);
training with `sara.objective shifcon` reads it (`sara/shifcon.py`, docs/objectives.md).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from sara_megatron.io import commit_file, temporary_path

FORMAT = "sara-language-vectors-1"


@dataclasses.dataclass
class LanguageVectors:
    """The mean hidden state entering chosen layers, per language.

    Attributes:
        layers: The global 0-based layers whose input each row describes, in row order.
        vectors: language -> [len(layers), H] fp32 tensor.
        anchor_language: The language the others are shifted towards.
        model_fingerprint: The fingerprint of the checkpoint the vectors were taken from.
        tokens: language -> the number of tokens averaged.
        normalisation: How the hidden states made each vector (`sara/shifcon_extraction.py`):
            "sentence_l2" (each sample's token mean L2-normalised, then averaged over samples,
            as ShifCon's authors do) or "token_mean" (the mean over every token). A file written
            before the normalisation was recorded holds token means.
    """

    layers: tuple[int, ...]
    vectors: dict[str, torch.Tensor]
    anchor_language: str
    model_fingerprint: str
    tokens: dict[str, int]
    normalisation: str = "token_mean"

    def at(self, language: str, layer: int) -> torch.Tensor:
        """One language's vector entering one layer.

        Args:
            language: A language the file holds.
            layer: A global 0-based layer the file holds.

        Returns:
            The [H] vector.

        Raises:
            KeyError: The file holds no vector for that language or layer.
        """
        if language not in self.vectors:
            raise KeyError(f"no language vector for {language!r} (have {sorted(self.vectors)})")
        if layer not in self.layers:
            raise KeyError(f"language vectors hold layers {list(self.layers)}, not {layer}")
        return self.vectors[language][self.layers.index(layer)]


def save_language_vectors(path: str, vectors: LanguageVectors) -> None:
    """Write one safetensors file (tensors named by language, metadata as JSON), atomically.

    Args:
        path: The .safetensors file to write (replaced whole, never half-written).
        vectors: What to write.
    """
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "layers": json.dumps(list(vectors.layers)),
                "anchor_language": vectors.anchor_language,
                "model_fingerprint": vectors.model_fingerprint,
                "tokens": json.dumps(vectors.tokens), "normalisation": vectors.normalisation}
    tmp = temporary_path(path)
    save_file({lang: v.float().clone().contiguous() for lang, v in vectors.vectors.items()}, tmp,
              metadata=metadata)
    commit_file(tmp, path)


def load_language_vectors(path: str) -> LanguageVectors:
    """Read a file `save_language_vectors` wrote.

    Args:
        path: The .safetensors file.

    Returns:
        The language vectors it holds.

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: The file is not of this format.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"language vectors {path}: no such file "
                                "(tools/extract_language_vectors.py writes it)")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a language-vector file of format {FORMAT} "
                             f"(format {metadata.get('format')!r})")
        vectors = {name: f.get_tensor(name) for name in f.keys()}
    return LanguageVectors(tuple(json.loads(metadata["layers"])), vectors,
                           metadata["anchor_language"], metadata["model_fingerprint"],
                           json.loads(metadata["tokens"]),
                           metadata.get("normalisation", "token_mean"))
