"""Safetensors files read lazily by slice and written as a stream.

Reading: `SafetensorsCheckpoint` parses only the headers of a Hugging Face checkpoint (one
`model.safetensors`, or shards listed by `model.safetensors.index.json`) and reads the bytes of the
rows a caller asks for with `os.preadv` into a fresh tensor. There is no mmap: a converting rank's
resident memory is its model shard plus the one slice being read, never the pages of files it
touched (an mmap'd file would count in its RSS for as long as the file stays open).

Writing: `SafetensorsStreamWriter` writes the header first — every shape and dtype is known from
the plan before any tensor exists — and then each tensor's bytes in plan order, so one tensor at a
time is in memory. The result is an ordinary safetensors file (`safe_open` and transformers read
it); the format is an 8-byte little-endian header length, a JSON header padded with spaces to a
multiple of 8, then the tensors' bytes back to back without holes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable, Sequence

import torch

from sara_megatron.conversion.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_safetensors(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16", "F32", ...).

    Args:
        name: The dtype name of a safetensors header.

    Raises:
        ConversionError: The name is not a supported dtype.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConversionError(f"unsupported safetensors dtype {name!r}") from None


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype name ("BF16", "F32", ...) of a torch dtype.

    Args:
        dtype: A torch dtype.

    Raises:
        ConversionError: The dtype has no safetensors name.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConversionError(f"dtype {dtype} has no safetensors name") from None


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str) -> tuple[dict, int]:
    """Read the JSON header of a safetensors file.

    Args:
        path: The safetensors file.

    Returns:
        `(header, data_start)`: the header dict and the absolute byte offset of the data section.

    Raises:
        ConversionError: The file is shorter than 8 bytes, announces a header over 100 MiB, or its
            header is not valid JSON.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise ConversionError(f"{path}: not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: unreadable safetensors header: {e}") from None
    return header, 8 + length


def _preadv_exact(fd: int, out: torch.Tensor, offset: int, path: str) -> None:
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):  # Linux returns at most ~2 GiB per call
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ConversionError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint folder, read lazily by slice.

    The headers are read and checked at construction; tensor bytes only by `read`. Use it as a
    context manager (or call `close`) to close the files opened for reading.

    Args:
        hf_dir: The folder holding `model.safetensors`, or shards with
            `model.safetensors.index.json`.

    Raises:
        ConversionError: No safetensors weights, both a single file and an index, several files
            without an index, an index naming missing files or disagreeing with the headers, a
            tensor in two files, or a header whose byte range does not fit its dtype and shape.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        self.files = self._find_files()
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            header, data_start = read_header(os.path.join(self.dir, file))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.entries:
                    raise ConversionError(
                        f"tensor {name} is in two files: {self.entries[name].file} and {file}"
                    )
                begin, end = info["data_offsets"]
                entry = TensorEntry(
                    file=file,
                    dtype=dtype_from_safetensors(info["dtype"]),
                    shape=tuple(info["shape"]),
                    begin=data_start + begin,
                    end=data_start + end,
                )
                if end - begin != _numel(entry.shape) * _element_size(entry.dtype):
                    raise ConversionError(
                        f"{file}: header of {name} gives {end - begin} bytes for "
                        f"{info['dtype']} {list(entry.shape)}"
                    )
                self.entries[name] = entry
        self._check_index()
        self._fds: dict[str, int] = {}

    def _find_files(self) -> list[str]:
        index = os.path.join(self.dir, INDEX_FILE)
        if os.path.exists(index) and os.path.exists(os.path.join(self.dir, SINGLE_FILE)):
            # transformers would load model.safetensors and ignore the shards: refuse to guess.
            raise ConversionError(
                f"{self.dir} holds both {SINGLE_FILE} and {INDEX_FILE}; remove the stale one"
            )
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map = json.load(f).get("weight_map") or {}
            files = sorted(set(self.weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(self.dir, f))]
            if missing:
                raise ConversionError(f"{INDEX_FILE} in {self.dir} names missing files: {missing}")
            return files
        self.weight_map = None
        files = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(
                f"no safetensors weights in {self.dir} (expected {SINGLE_FILE} or "
                f"{INDEX_FILE} with its shards; .bin / .pt checkpoints are not read)"
            )
        if len(files) > 1:
            raise ConversionError(
                f"{self.dir} holds several safetensors files {files} but no {INDEX_FILE}"
            )
        return files

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        wrong = sorted(
            name for name, file in self.weight_map.items()
            if name not in self.entries or self.entries[name].file != file
        )
        if wrong:
            raise ConversionError(
                f"{INDEX_FILE} does not match the shards' headers for tensors: {wrong[:20]}"
                + (f" (and {len(wrong) - 20} more)" if len(wrong) > 20 else "")
            )
        unlisted = sorted(set(self.entries) - set(self.weight_map))
        if unlisted:
            raise ConversionError(f"tensors in the shards but not in {INDEX_FILE}: {unlisted[:20]}")

    # --- reading -------------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the files opened for reading (the headers stay known)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(os.path.join(self.dir, file), os.O_RDONLY)
        return self._fds[file]

    def names(self) -> set[str]:
        """The names of all tensors in the checkpoint."""
        return set(self.entries)

    def read(self, name: str, rows: tuple[int, int] | None = None,
             rest: Sequence[slice] = (), out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) on axis 0 (all when None), then `rest` slices on the other axes.

        Only the bytes of the requested rows are read. With `out` (the destination, e.g. a
        parameter's rows) the bytes go straight into it when it is contiguous, of the file's
        dtype and no later axis is sliced — no intermediate copy; otherwise through a temporary.
        A slice on a later axis reads those rows whole and narrows them.

        Args:
            name: The hub tensor name.
            rows: `(start, stop)` rows on axis 0, or None for all.
            rest: Slices on the axes after the first (none: whole).
            out: A destination tensor shaped like the selection, or None for a new tensor.

        Returns:
            The selected part, in the file's dtype (or `out`'s when given): `out` itself when given.

        Raises:
            ConversionError: The rows are out of range, or the file ends early.
        """
        entry = self.entries[name]
        shape = entry.shape
        if not shape:
            start, stop = 0, 1
        else:
            start, stop = rows if rows is not None else (0, shape[0])
            if not 0 <= start <= stop <= shape[0]:
                raise ConversionError(f"rows [{start}, {stop}) out of range for {name} {shape}")
        sliced = bool(rest) and any(s != slice(None) for s in rest)
        rows_shape = (stop - start,) + shape[1:] if shape else ()
        direct = (out is not None and not sliced and out.dtype == entry.dtype
                  and out.is_contiguous() and tuple(out.shape) == rows_shape)
        buf = out if direct else torch.empty(rows_shape, dtype=entry.dtype)
        if buf.numel():
            row_bytes = _numel(shape[1:]) * _element_size(entry.dtype)
            _preadv_exact(self._fd(entry.file), buf.reshape(-1), entry.begin + start * row_bytes,
                          entry.file)
        if direct:
            return out
        if sliced:
            buf = buf[(slice(None), *rest)]
        if out is None:
            return buf.clone() if sliced else buf
        return out.copy_(buf)


# --- writing -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """The name, dtype and shape of one tensor to write into a safetensors file.

    Args:
        name: The hub tensor name.
        dtype: The dtype it is written in.
        shape: Its shape.
    """
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The size of the tensor's data in bytes."""
        return _numel(self.shape) * _element_size(self.dtype)


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor, in the order of `specs`.

    The header is written at construction from `specs`; `write` then appends each tensor's bytes,
    and `close` checks that all were written.

    Args:
        path: The file to create.
        specs: The tensors the file holds, in writing order.
        metadata: The header's `__metadata__` (default `{"format": "pt"}`).
    """

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: dict | None = None):
        self.path = path
        self.specs = list(specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": safetensors_dtype_name(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor's bytes (moved to the CPU).

        Args:
            name: Its name, which must be the next spec's.
            tensor: The tensor, of the next spec's dtype and shape.

        Raises:
            ConversionError: More tensors than planned, or one that is not the next spec.
        """
        if self._next >= len(self.specs):
            raise ConversionError(f"{self.path}: more tensors than planned (got {name})")
        spec = self.specs[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise ConversionError(
                f"{self.path}: expected {spec.name} {spec.dtype} {spec.shape}, got "
                f"{name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close without the completeness check (the caller is discarding the file)."""
        self._file.close()

    def close(self) -> None:
        """Flush, fsync and close the file once every planned tensor was written.

        Raises:
            ConversionError: Some planned tensors were never written (the file is closed).
        """
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            self._file.close()
            raise ConversionError(f"{self.path}: tensors never written: {missing[:10]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into files of at most `max_shard_bytes` (a bigger tensor alone).

    Args:
        specs: The tensors in writing order.
        max_shard_bytes: The largest file, in bytes of tensor data.

    Returns:
        The tensors of each file, in order (no empty file).
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[-1] else shards[:-1]


def shard_file_names(count: int) -> list[str]:
    """The file names of `count` shards: `model.safetensors` alone, or `model-0000i-of-0000n...`.

    Args:
        count: The number of files.
    """
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '20KB' / bytes -> bytes (decimal units, as transformers uses).

    GiB / MiB / KiB are binary units.

    Args:
        text: A size with an optional unit, or a number of bytes.

    Returns:
        The size in bytes.
    """
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10),
                         ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)
