"""Which model an evaluation asked: the fingerprint its output folder records, and the folder
kinds `--backend hf` can and cannot read.

A folder's base name says nothing about its weights (`runs/fft/export` and `runs/sara/export` are
both "export"), so a resume is matched on content:

- hf backend: the sha256 of every file transformers reads to answer — the weights
  (`*.safetensors`, `*.bin` and their index), `config.json`, `generation_config.json` (the default
  top-k lives there), the tokenizer and chat template files, and a ShifCon export's `shifcon.json`
  (which records its language vectors' sha256). Hashes are remembered in the
  verification stamps (`file_stamps`), so a resume of unchanged weights reads none of them again.
- openai backend: the served model's name and the revision the user states (`--model-revision`);
  the served weights are out of reach, so that revision is the only thing that tells two models
  served under one name apart.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Mapping

from sara_megatron.model_folders import folder_kind
from sara_megatron.file_stamps import FileStamp
from sara_megatron.tool_errors import UserFacingError

HF_MODEL_FILE_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
    "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "*.tiktoken", "chat_template*", "shifcon.json",
)

class ModelFolderError(UserFacingError, ValueError):
    """A --model-dir that is not a Hugging Face model folder (says what it is instead)."""


def hf_model_files(model_dir: str) -> list[str]:
    """The top-level files of an HF model folder that the fingerprint covers, sorted.

    Args:
        model_dir: The folder.
    """
    return sorted(name for name in os.listdir(model_dir)
                  if os.path.isfile(os.path.join(model_dir, name))
                  and any(fnmatch.fnmatch(name, pattern) for pattern in HF_MODEL_FILE_PATTERNS))


def check_hf_model_folder(model_dir: str) -> None:
    """Refuse, naming what it is, a folder `--backend hf` cannot load.

    Args:
        model_dir: The `--model-dir` folder.

    Raises:
        ModelFolderError: A Megatron-Core checkpoint, a training run's folder, a folder without
            config.json, or one without weights.
    """
    kind = folder_kind(model_dir)
    needed = ("--backend hf needs a Hugging Face model folder (config.json, safetensors weights, "
              "the tokenizer)")
    if kind == "megatron":
        raise ModelFolderError(
            f"--model-dir {model_dir} is a Megatron-Core checkpoint (torch_dist), not a Hugging "
            f"Face model folder; {needed}: export it with `python tools/convert_hf.py export "
            f"--megatron-dir {model_dir} --out DIR` and evaluate DIR")
    if kind == "training-save":
        raise ModelFolderError(
            f"--model-dir {model_dir} is a training run's checkpoint folder (iter_* Megatron-Core "
            f"checkpoints), not a Hugging Face model folder; {needed}: export one of its "
            "checkpoints with `python tools/convert_hf.py export --megatron-dir "
            f"{os.path.join(model_dir, 'iter_NNNNNNN')} --out DIR` and evaluate DIR")
    if kind != "hf":
        raise ModelFolderError(f"--model-dir {model_dir} has no config.json: not a Hugging Face "
                               f"model folder; {needed}")
    if not any(fnmatch.fnmatch(name, pattern) for name in hf_model_files(model_dir)
               for pattern in ("*.safetensors", "*.bin")):
        raise ModelFolderError(f"--model-dir {model_dir} has a config.json but no weights "
                               "(*.safetensors or *.bin); " + needed)


def hf_model_fingerprint(model_dir: str) -> dict:
    """The fingerprint of an HF model folder (hashes remembered by `file_stamps`).

    Args:
        model_dir: The folder.

    Returns:
        {"backend": "hf", "files": {name: sha256}} over `hf_model_files`.
    """
    model_dir = os.fspath(model_dir)
    stamp = FileStamp(model_dir, model_dir)
    files = {name: stamp.sha256(name) for name in hf_model_files(model_dir)}
    stamp.save()
    return {"backend": "hf", "files": files}


def served_model_fingerprint(model: str, revision: str | None) -> dict:
    """The fingerprint of a served model: its name and the revision the user gave.

    Args:
        model: The served model's name.
        revision: `--model-revision`, or None.
    """
    return {"backend": "openai", "model": model, "revision": revision}


def fingerprint_changes(previous: Mapping | None, current: Mapping) -> list[str]:
    """What differs between two model fingerprints, one phrase per difference (empty: the same
    model).

    Args:
        previous: The fingerprint a results file recorded (None: none recorded).
        current: This run's.
    """
    if not previous:
        return ["the folder's results record no model fingerprint"]
    if previous.get("backend") != current.get("backend"):
        return [f"backend {previous.get('backend')} -> {current.get('backend')}"]
    if current.get("backend") == "hf":
        before, now = previous.get("files") or {}, current.get("files") or {}
        changes = []
        for name in sorted(set(before) | set(now)):
            if name not in now:
                changes.append(f"{name} is gone")
            elif name not in before:
                changes.append(f"{name} is new")
            elif before[name] != now[name]:
                changes.append(f"{name} sha256 {before[name][:12]}… -> {now[name][:12]}…")
        return changes
    return [f"{key} {previous.get(key)!r} -> {current.get(key)!r}"
            for key in ("model", "revision") if previous.get(key) != current.get(key)]
