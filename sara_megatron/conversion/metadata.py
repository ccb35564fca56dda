"""What conversion puts beside a checkpoint, and how its outputs appear atomically.

An imported Megatron checkpoint folder holds megatron's torch_dist files (`metadata.json`,
`.metadata`, `*.distcp`, `common.pt` — `load_model_weights(model, folder)` reads them at any
layout) plus the record `checkpointing.record` reads and writes (`sara_conversion.json`: family,
the HF config.json as read, the architecture we built, vocab size and padding, dtype, the layout
used, and the source fingerprint) and `hf_assets/`: every non-weight file of the HF folder
(config.json, generation_config.json, tokenizer files, chat template, license, ...), copied as
they are, so export can write a complete HF folder without the source.

The fingerprint is the SHA-256 of each source safetensors file (header and data, i.e. the file's
bytes: the same value as `sha256sum` and as the hub's Git LFS object id), plus one combined
SHA-256 over the lines "<file name> <sha256>\n" in name order.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import shutil

from sara_megatron.conversion.errors import ConversionError
from sara_megatron.conversion.safetensors_io import INDEX_FILE

# Weight files are converted, never copied; everything else at the top of an HF folder is an
# asset (tokenizer, configs, chat template, license, README).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".onnx", ".distcp")
_WEIGHT_FILES = (INDEX_FILE, "pytorch_model.bin.index.json", "tf_model.h5.index.json")


def hf_asset_files(hf_dir: str) -> list[str]:
    """The top-level non-weight files of an HF folder.

    Args:
        hf_dir: The HF model folder.

    Returns:
        The file names, sorted (hidden files, weight files and weight indexes left out).
    """
    names = []
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_FILES:
            continue
        names.append(name)
    return names


def copy_assets(src_dir: str, names: list[str], dst_dir: str) -> None:
    """Copy the named files from one folder into another (created if missing), metadata included.

    Args:
        src_dir: The folder holding the assets.
        names: The file names to copy.
        dst_dir: The destination folder.
    """
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def combined_fingerprint(file_hashes: dict[str, str]) -> str:
    """The SHA-256 (hex) over the lines "<file name> <sha256>\\n" in file-name order.

    Args:
        file_hashes: File name → SHA-256 hex digest of its bytes.
    """
    lines = "".join(f"{name} {file_hashes[name]}\n" for name in sorted(file_hashes))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def package_version(name: str) -> str | None:
    """The installed version of a distribution package, or None when it is not installed.

    Args:
        name: The distribution name ("torch", "megatron-core", ...).
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def now_utc() -> str:
    """The current UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class AtomicOutputDir:
    """An output folder that appears complete or not at all.

    Work happens in a sibling `.<name>.partial`; `commit()` renames it into place. An existing
    output is refused unless `overwrite`, and then replaced only at commit (moved aside first,
    removed after the rename). A crash or kill leaves at most the `.partial` sibling, which the
    next run removes.

    Args:
        out: The output folder.
        overwrite: Replace an existing `out` at commit instead of refusing it.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = os.path.abspath(os.fspath(out))
        parent, name = os.path.split(self.out)
        self.partial = os.path.join(parent, f".{name}.partial")
        self._old = os.path.join(parent, f".{name}.old")
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse an output that cannot be written, before any work.

        Raises:
            ConversionError: `out` exists and `overwrite` is off, or its parent folder is missing.
        """
        if os.path.lexists(self.out) and not self.overwrite:
            raise ConversionError(
                f"output {self.out} already exists; pass --overwrite to replace it"
            )
        parent = os.path.dirname(self.out)
        if not os.path.isdir(parent):
            raise ConversionError(f"parent folder of the output does not exist: {parent}")

    def prepare(self) -> str:
        """Check again and create an empty `.partial` sibling (removing a stale one).

        Returns:
            The path of the `.partial` folder to write into.

        Raises:
            ConversionError: As `check`.
        """
        self.check()
        shutil.rmtree(self.partial, ignore_errors=True)
        os.makedirs(self.partial)
        return self.partial

    def commit(self) -> None:
        """Rename the `.partial` folder into place, replacing an existing output when `overwrite`.

        Raises:
            ConversionError: The output appeared during the work and `overwrite` is off (the
                `.partial` folder is left as it is).
        """
        if os.path.lexists(self.out):
            if not self.overwrite:  # appeared while we worked
                raise ConversionError(f"output {self.out} appeared during conversion; left as "
                                      f"{self.partial}")
            shutil.rmtree(self._old, ignore_errors=True)
            os.rename(self.out, self._old)
            os.rename(self.partial, self.out)
            if os.path.isdir(self._old):
                shutil.rmtree(self._old)
            else:
                os.remove(self._old)
        else:
            os.rename(self.partial, self.out)

    def abort(self) -> None:
        """Remove the `.partial` folder, if any."""
        shutil.rmtree(self.partial, ignore_errors=True)
