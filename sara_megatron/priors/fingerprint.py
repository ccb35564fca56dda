"""Which model a prior store was extracted from: the model fingerprint.

Priors are only meaningful for the weights they were computed with, so the store records a
fingerprint and readers refuse a store from another model. When the checkpoint was imported from
Hugging Face by tools/convert_hf.py, its `sara_conversion.json` holds the fingerprint of the source
safetensors files (`source.fingerprint`, see sara_megatron/conversion/metadata.py) and that is the
model's fingerprint; otherwise it is computed from the checkpoint files themselves. This module is
the one place that decides it, so extraction and training always agree.
"""

from __future__ import annotations

import hashlib
import os

from sara_megatron.checkpointing.manifest import MANIFEST_FILE
from sara_megatron.checkpointing.record import ASSETS_DIR, METADATA_FILE, read_metadata
from sara_megatron.io import sha256_file

# Not weights: left out of the computed fingerprint (the manifest of file hashes is bookkeeping
# written at save).
_NOT_WEIGHTS = (METADATA_FILE, ASSETS_DIR, MANIFEST_FILE)


def _from_conversion_metadata(checkpoint_dir: str) -> str | None:
    record = read_metadata(checkpoint_dir)
    if record is None:
        return None
    if "training" in record:  # a training checkpoint: its weights moved on from the source's
        return None
    fingerprint = (record.get("source") or {}).get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"{os.path.join(checkpoint_dir, METADATA_FILE)} has no source.fingerprint")
    return "hf-safetensors-sha256:" + fingerprint


def checkpoint_files_fingerprint(checkpoint_dir: str) -> str:
    """The fingerprint of the checkpoint's own files: sha256 over every weight file (relative
    path and content), in path order; the record, kept HF assets and manifest are left out.

    Args:
        checkpoint_dir: a Megatron checkpoint folder.

    Returns:
        "sha256-files:<hex digest>".

    Raises:
        FileNotFoundError: the folder holds no weight file.
    """
    files = []
    for dirpath, dirnames, names in os.walk(checkpoint_dir):
        if dirpath == checkpoint_dir:
            dirnames[:] = [d for d in dirnames if d not in _NOT_WEIGHTS]
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), checkpoint_dir)
            if rel not in _NOT_WEIGHTS:
                files.append(rel)
    if not files:
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} is empty")
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{sha256_file(os.path.join(checkpoint_dir, rel))}\n".encode("utf-8"))
    return "sha256-files:" + h.hexdigest()


def model_fingerprint(checkpoint_dir: str | os.PathLike) -> str:
    """The model fingerprint of a checkpoint: the HF source's for one tools/convert_hf.py
    imported (and not trained since), else `checkpoint_files_fingerprint`.

    Args:
        checkpoint_dir: a Megatron checkpoint folder.

    Returns:
        "hf-safetensors-sha256:<hex>" or "sha256-files:<hex>".

    Raises:
        FileNotFoundError: the folder does not exist or holds no weight file.
        ValueError: a conversion record without its source fingerprint.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    return _from_conversion_metadata(checkpoint_dir) or checkpoint_files_fingerprint(checkpoint_dir)


def prior_anchor_fingerprints(checkpoint_dir: str | os.PathLike,
                              store_fingerprint: str | None = None) -> tuple[str, ...]:
    """The model fingerprints whose priors fit a run that starts from `checkpoint_dir`: its own,
    and, for a checkpoint trained from a converted one, that converted model's. SARA's anchors
    come from the model before fine-tuning, so a run continued from a fine-tuned checkpoint (at
    a layout its optimizer state cannot be resumed at, say) keeps the priors of the first run.

    Args:
        checkpoint_dir: the run's starting checkpoint folder.
        store_fingerprint: the prior store's; when it is the converted model's, the checkpoint's
            own files are not hashed (a training checkpoint holds the optimizer state too:
            hundreds of GB at 30B parameters).

    Raises:
        FileNotFoundError: the folder does not exist or holds no weight file.
        ValueError: a conversion record without its source fingerprint.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    record = read_metadata(checkpoint_dir)
    converted = _from_conversion_metadata(checkpoint_dir)
    if converted is not None:
        return (converted,)
    source = ((record or {}).get("source") or {}).get("fingerprint")
    started_from = (("hf-safetensors-sha256:" + source,)
                    if record is not None and isinstance(source, str) and source else ())
    if store_fingerprint is not None and store_fingerprint in started_from:
        return started_from
    return (checkpoint_files_fingerprint(checkpoint_dir),) + started_from
