"""Safetensors checkpoints: header-only planning, exact reads and preallocated writes.

Nothing here memory-maps a file. Opening a checkpoint reads only the JSON headers, so a
merge can be planned from names, dtypes and shapes alone. Tensors (or row ranges of them)
are then read with ``preadv`` straight into caller-owned arrays, and written with
``pwrite`` into files whose layout is fixed before the first byte of data is produced.
The resident memory of a merge therefore stays at the size of the buffers it works on.

File format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header mapping each tensor name to ``dtype``, ``shape`` and
``data_offsets`` (relative to the end of the header), then the raw little-endian data.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import struct
import sys
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from jaxmerge.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
_HEADER_ALIGNMENT = 8


def _build_dtypes() -> dict[str, np.dtype]:
    dtypes = {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
    }
    for code, attribute in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(ml_dtypes, attribute):
            dtypes[code] = np.dtype(getattr(ml_dtypes, attribute))
    return dtypes


DTYPES: dict[str, np.dtype] = _build_dtypes()
_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


def dtype_code(dtype) -> str:
    """Returns the safetensors dtype code (e.g. ``"BF16"``) of a numpy dtype.

    Raises:
      ValueError: the dtype has no safetensors code.
    """
    dtype = np.dtype(dtype)
    code = _CODES.get(dtype)
    if code is None:
        raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file")
    return code


def _row_nbytes(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> int:
    """Bytes per index of dim 0 of a C-ordered tensor (all of it when 0-d)."""
    return math.prod(shape[1:]) * dtype.itemsize if shape else nbytes


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    path: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        """Bytes per index of dim 0 (the whole tensor for a 0-d tensor)."""
        return _row_nbytes(self.shape, self.dtype, self.nbytes)


# --------------------------------------------------------------------------- reading headers


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header_bytes(path: pathlib.Path) -> tuple[bytes, int, int]:
    """Returns (header JSON bytes, data section start, file size)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is not a safetensors file: only {size} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path} is not a safetensors file or is truncated: header length "
                    f"{header_len} does not fit in its {size} bytes")
            raw = file.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a safetensors file") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if len(raw) != header_len:
        raise CheckpointError(f"{path} is truncated inside its header")
    return raw, 8 + header_len, size


def _parse_entry(path: pathlib.Path, name: str, spec, data_start: int,
                 size: int) -> TensorEntry:
    """Validates one header entry and turns it into a TensorEntry."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(f"{where} needs 'dtype', 'shape' and 'data_offsets' in the header")
    code = spec["dtype"]
    if code not in DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {code!r}")
    dtype = DTYPES[code]
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has an invalid shape {shape!r}")
    offsets = spec["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where} has {end - begin} bytes of data but {code}{shape} needs {nbytes}")
    if data_start + end > size:
        raise CheckpointError(
            f"{where} ends at byte {data_start + end} but the file has only {size} bytes "
            "(truncated file?)")
    return TensorEntry(name=name, path=path, dtype=dtype, shape=tuple(shape),
                       offset=data_start + begin, nbytes=nbytes)


def read_header(path) -> tuple[dict[str, TensorEntry], dict]:
    """Reads and validates the header of one safetensors file.

    Args:
      path: the ``.safetensors`` file.

    Returns:
      The tensors in file order (by data offset) and the ``__metadata__`` dict (or ``{}``).

    Raises:
      CheckpointError: the file is missing, unreadable, truncated or malformed.
    """
    path = pathlib.Path(path)
    raw, data_start, size = _read_header_bytes(path)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} has a malformed JSON header: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} has a malformed header: __metadata__ is not an object")
    entries = [_parse_entry(path, name, spec, data_start, size) for name, spec in header.items()]
    entries.sort(key=lambda entry: entry.offset)
    return {entry.name: entry for entry in entries}, metadata


# --------------------------------------------------------------------------- opening checkpoints


def _load_json(path: pathlib.Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what} {path} is not valid JSON: {error}") from None


def _read_weight_map(index_path: pathlib.Path) -> dict[str, str]:
    index = _load_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(
            f"index {index_path} has no valid 'weight_map' (tensor name -> shard file)")
    return weight_map


def _sharded_tensors(directory: pathlib.Path) -> dict[str, TensorEntry]:
    """Tensors of a checkpoint described by model.safetensors.index.json."""
    index_path = directory / INDEX_FILE
    weight_map = _read_weight_map(index_path)
    expected: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        expected.setdefault(shard, []).append(name)
    tensors = {}
    for shard in sorted(expected):
        shard_path = directory / shard
        if not shard_path.is_file():
            raise CheckpointError(
                f"shard {shard_path} listed in {index_path} is missing "
                f"(it should contain tensor {expected[shard][0]!r})")
        entries, _ = read_header(shard_path)
        for name in expected[shard]:
            if name not in entries:
                raise CheckpointError(
                    f"{index_path} maps tensor {name!r} to {shard}, but {shard_path} "
                    "does not contain it")
        wanted = set(expected[shard])
        tensors.update((name, entry) for name, entry in entries.items() if name in wanted)
    return tensors


def _single_file(directory: pathlib.Path) -> pathlib.Path:
    """The one safetensors file of an unsharded checkpoint directory."""
    if (directory / SINGLE_FILE).is_file():
        return directory / SINGLE_FILE
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint directory {directory} has no .safetensors files")
    if len(files) > 1:
        raise CheckpointError(
            f"checkpoint directory {directory} has {len(files)} .safetensors files but no "
            f"{INDEX_FILE} saying which tensor is where")
    return files[0]


def _read_config(directory: pathlib.Path) -> dict | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    config = _load_json(path, "config")
    if not isinstance(config, dict):
        raise CheckpointError(f"config {path} is not a JSON object")
    return config


# --------------------------------------------------------------------------- low-level I/O


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Reads into ``buffer`` from ``offset`` until it is full or the file ends."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [buffer[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(buffer) - done, offset + done)
            buffer[done:done + len(chunk)] = chunk
            count = len(chunk)
        if count == 0:
            break
        done += count
    return done


def _pwrite_all(fd: int, buffer: memoryview, offset: int) -> None:
    """Writes all of ``buffer`` at ``offset``, looping over partial writes."""
    done = 0
    while done < len(buffer):
        done += os.pwrite(fd, buffer[done:], offset + done)


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing ``length`` bytes at ``offset`` of ``fd`` to disk, without waiting
    (Linux ``sync_file_range``), so that the ``fsync`` closing the file finds little
    left to do: ~0.1 s of a 1.3 s task-arithmetic merge of SmolLM2 + 3 experts. A
    no-op elsewhere; a failure is left for that ``fsync`` to report."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _byte_view(array: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array (any dtype, any rank) as a flat memoryview."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _row_span(shape: tuple[int, ...], rows: tuple[int, int] | None, what: str) -> tuple[int, int]:
    """Checks ``rows`` against ``shape`` and returns it as (start, stop)."""
    if rows is None:
        return 0, shape[0] if shape else 1
    if not shape:
        raise ValueError(f"{what} is 0-d and has no rows to slice")
    start, stop = rows
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows {rows} are out of range for {what} with shape {shape}")
    return start, stop


# --------------------------------------------------------------------------- Checkpoint


class Checkpoint:
    """A read-only Hugging Face safetensors checkpoint, opened from its headers alone.

    Attributes:
      directory: the checkpoint directory (the parent directory for a single file path).
      tensors: every tensor by name, in shard order then file order.
      config: the parsed ``config.json``, or None if there is none.
      bytes_read: tensor bytes read so far.
    """

    def __init__(self, directory: pathlib.Path, tensors: dict[str, TensorEntry],
                 config: dict | None):
        self.directory = directory
        self.tensors = tensors
        self.config = config
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[pathlib.Path, int] = {}

    @classmethod
    def open(cls, directory) -> Checkpoint:
        """Opens a checkpoint directory (single file, sharded with an index) or one file.

        Args:
          directory: a directory holding ``model.safetensors``, an index and its shards, or
            exactly one ``*.safetensors`` file; or the path of a ``.safetensors`` file.

        Raises:
          CheckpointError: the path, a shard, a tensor or the config is missing or malformed.
        """
        path = pathlib.Path(directory)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(
                    f"checkpoint {path} is not a directory or a .safetensors file")
            tensors, _ = read_header(path)
            return cls(path.parent, tensors, _read_config(path.parent))
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} is not a directory")
        if (path / INDEX_FILE).is_file():
            tensors = _sharded_tensors(path)
        else:
            tensors, _ = read_header(_single_file(path))
        return cls(path, tensors, _read_config(path))

    def read(self, name: str, out: np.ndarray | None = None,
             rows: tuple[int, int] | None = None) -> np.ndarray:
        """Reads a tensor, or rows ``[start, stop)`` of its first dimension.

        Args:
          name: the tensor name.
          out: optional C-contiguous, writable array of the tensor's dtype and of the shape
            read (it may be a view into a larger buffer); read into directly.
          rows: optional (start, stop) range of dim 0.

        Returns:
          ``out``, or a new array when ``out`` is None.

        Raises:
          CheckpointError: unknown tensor, unreadable or truncated file.
          ValueError: ``out`` or ``rows`` does not fit the tensor.
        """
        entry = self.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {self.directory} has no tensor {name!r}")
        start, stop = _row_span(entry.shape, rows, f"tensor {name!r}")
        shape = entry.shape if rows is None else (stop - start, *entry.shape[1:])
        if out is None:
            out = np.empty(shape, entry.dtype)
        else:
            _check_out(out, entry.dtype, shape, name)
        buffer = _byte_view(out)
        fd = self._fd(entry.path)
        try:
            count = _pread_into(fd, buffer, entry.offset + start * entry.row_nbytes)
        except OSError as error:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {entry.path}: {error.strerror or error}"
            ) from None
        with self._lock:
            self.bytes_read += count
        if count != len(buffer):
            raise CheckpointError(
                f"{entry.path}: tensor {name!r} is truncated (read {count} of {len(buffer)} "
                "bytes)")
        return out

    def _fd(self, path: pathlib.Path) -> int:
        """The shard's file descriptor, opened on first use."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as error:
                    raise CheckpointError(
                        f"cannot open {path}: {error.strerror or error}") from None
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        """Closes the open shard files (a later read opens them again)."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, {len(self.tensors)} tensors)"


def _check_out(out: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out for tensor {name!r} must be a numpy array, got {type(out)}")
    if out.dtype != dtype or out.shape != shape:
        raise ValueError(f"out for tensor {name!r} is {out.dtype}{list(out.shape)}, "
                         f"expected {dtype}{list(shape)}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out for tensor {name!r} must be C-contiguous and writable")


# --------------------------------------------------------------------------- ShardedWriter


@dataclass(frozen=True)
class _Slot:
    """Where one output tensor goes."""

    shard: int
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        return _row_nbytes(self.shape, self.dtype, self.nbytes)


def shard_file_name(index: int, count: int) -> str:
    """HF-style shard name: ``model.safetensors`` or ``model-00001-of-00003.safetensors``."""
    if count == 1:
        return SINGLE_FILE
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _assign_shards(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """Greedily groups tensor indices, in order, into shards of at most max_shard_size bytes."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_shard_size:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def _header_bytes(specs: dict, metadata: dict[str, str]) -> bytes:
    """JSON header padded with spaces so the data section starts 8-byte aligned."""
    header = json.dumps({"__metadata__": metadata, **specs}, separators=(",", ":"))
    raw = header.encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def _covered(ranges: list[tuple[int, int]], nbytes: int) -> bool:
    """Whether the byte ranges together cover [0, nbytes)."""
    reached = 0
    for start, stop in sorted(ranges):
        if start > reached:
            return False
        reached = max(reached, stop)
    return reached >= nbytes


class ShardedWriter:
    """Writes a safetensors checkpoint whose layout is fixed up front.

    Every shard's header is written and the file sized at construction, so tensors (or row
    ranges of them) can then be written in any order, from any thread, with no output
    buffer. Within a shard, tensors are laid out by decreasing itemsize so every tensor's
    data is aligned to its own itemsize.
    """

    def __init__(self, directory, tensors: list[tuple[str, np.dtype, tuple[int, ...]]],
                 max_shard_size: int, metadata: dict[str, str] | None = None, *,
                 create: bool = True):
        """Creates the shard files.

        Args:
          directory: existing output directory.
          tensors: (name, dtype, shape) of every tensor, in output order.
          max_shard_size: most data bytes per shard (a bigger tensor gets a shard alone).
          metadata: extra string entries for each header's ``__metadata__``.
          create: create the files (header written, size fixed); False opens files that
            another process created with the same arguments, to write its own tensors
            or row ranges into them (multi-process merges).

        Raises:
          ValueError: duplicate names, unsupported dtypes or non-string metadata.
        """
        self.directory = pathlib.Path(directory)
        metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map strings to strings: {metadata}")
        tensors = [(name, np.dtype(dtype), tuple(int(d) for d in shape))
                   for name, dtype, shape in tensors]
        names = [name for name, _, _ in tensors]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"tensor {duplicate!r} is declared twice")
        sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in tensors]
        shards = _assign_shards(sizes, max_shard_size)
        self._files = [shard_file_name(i, len(shards)) for i in range(len(shards))]
        self._slots: dict[str, _Slot] = {}
        self._written: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
        self._lock = threading.Lock()
        self._fds: list[int] = []
        try:
            for shard, members in enumerate(shards):
                self._create_shard(shard, [tensors[i] for i in members], metadata, create)
        except BaseException:
            self.abort()
            raise

    def _create_shard(self, shard: int, tensors: list, metadata: dict[str, str],
                      create: bool = True) -> None:
        tensors = sorted(tensors, key=lambda tensor: -tensor[1].itemsize)
        specs, begin = {}, 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            specs[name] = {"dtype": dtype_code(dtype), "shape": list(shape),
                           "data_offsets": [begin, begin + nbytes]}
            begin += nbytes
        header = _header_bytes(specs, metadata)
        for name, dtype, shape in tensors:
            start = len(header) + specs[name]["data_offsets"][0]
            self._slots[name] = _Slot(shard, dtype, shape, start,
                                      math.prod(shape) * dtype.itemsize)
        path = self.directory / self._files[shard]
        if not create:
            self._fds.append(os.open(path, os.O_WRONLY))
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        _pwrite_all(fd, memoryview(header), 0)
        os.ftruncate(fd, len(header) + begin)

    @property
    def shard_files(self) -> list[str]:
        """Names of the shard files, in order."""
        return list(self._files)

    def write(self, name: str, array: np.ndarray, rows: tuple[int, int] | None = None) -> None:
        """Writes a whole tensor, or rows ``[start, stop)`` of its first dimension.

        Args:
          name: a declared tensor name.
          array: the data, of exactly the declared dtype; shape equal to the declared shape,
            or ``(stop - start, *shape[1:])`` with ``rows``.
          rows: optional (start, stop) range of dim 0.

        Raises:
          ValueError: unknown name, wrong dtype or shape, rows out of range.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} was not declared to the writer")
        array = np.asarray(array)
        start, stop = _row_span(slot.shape, rows, f"tensor {name!r}")
        shape = slot.shape if rows is None else (stop - start, *slot.shape[1:])
        if array.dtype != slot.dtype or array.shape != shape:
            raise ValueError(f"tensor {name!r} is declared {slot.dtype}{list(shape)} but got "
                             f"{array.dtype}{list(array.shape)}")
        buffer = _byte_view(np.ascontiguousarray(array))
        begin = start * slot.row_nbytes if rows is not None else 0
        _pwrite_all(self._fds[slot.shard], buffer, slot.offset + begin)
        _start_writeback(self._fds[slot.shard], slot.offset + begin, len(buffer))
        with self._lock:
            self._written[name].append((begin, begin + len(buffer)))

    @property
    def bytes_written(self) -> int:
        """Tensor bytes written through this writer so far."""
        with self._lock:
            return sum(stop - start for ranges in self._written.values()
                       for start, stop in ranges)

    @property
    def total_bytes(self) -> int:
        """Tensor bytes of the whole checkpoint."""
        return sum(slot.nbytes for slot in self._slots.values())

    def close(self, *, check: bool = True, index: bool = True) -> list[str]:
        """Checks every tensor was fully written, syncs the files and writes the index.

        Args:
          check: verify that every tensor was fully written through this writer (a
            multi-process merge checks byte totals across processes instead).
          index: write the index (one process does, in a multi-process merge).

        Returns:
          Names of the files written (shards, then the index if there is more than one).

        Raises:
          RuntimeError: a tensor was not (fully) written; the files are closed.
        """
        for name, slot in self._slots.items():
            if check and not _covered(self._written[name], slot.nbytes):
                self.abort()
                raise RuntimeError(f"tensor {name!r} was not fully written")
        for fd in self._fds:
            os.fsync(fd)
        self.abort()
        files = self.shard_files
        if len(files) > 1 and index:
            index_json = {
                "metadata": {"total_size": sum(slot.nbytes for slot in self._slots.values())},
                "weight_map": {name: files[self._slots[name].shard]
                               for name in sorted(self._slots)},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
            files.append(INDEX_FILE)
        return files

    def abort(self) -> None:
        """Closes the files without any checks (the caller removes them)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
