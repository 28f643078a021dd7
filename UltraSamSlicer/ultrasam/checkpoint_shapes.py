"""Read a checkpoint's tensor names, shapes and dtypes without reading or allocating its data.

A crafted file can declare tensors far larger than itself (a 16 MB file whose ``pos_embed`` says
(1, 4096, 4096, 0) asks for a 13 GB model), so :mod:`ultrasam.checkpoint` checks the declared
architecture before it builds anything. This module unpickles the file's ``data.pkl`` with
:class:`ultrasam.safe_pickle.Unpickler` rules, but every tensor becomes a ``meta`` tensor (shape
and dtype, no storage), after these checks against the zip archive itself:

- every record is stored uncompressed (as ``torch.save`` writes it) and lies within the file;
- every storage a tensor uses exists and holds at least ``numel * itemsize`` bytes;
- every tensor lies within its storage (no stride trick makes it larger than its bytes);
- the pickle's opcodes ask for no more memory than the pickle holds (CPython's unpickler sizes its
  memo by the largest index it is given: one edited ``LONG_BINPUT`` asks for 20 GB).

Only torch's zip format (PyTorch >= 1.6, every published SAM/UltraSam/MedSAM file) is read.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from ultrasam import safe_pickle


class DeclaredShapeError(ValueError):
    """The file's declarations contradict its own bytes; the message says which."""


class _Storage:
    """What a persistent id declares: dtype and element count of one record."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel


def read_meta(path: Path) -> Any:
    """The unpickled checkpoint with ``meta`` tensors in place of data (see the module docstring).

    Raises:
        DeclaredShapeError: a declaration does not fit the archive.
        safe_pickle.UnsafePickleError: the pickle asks to call something that could run code.
        zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ...: the file is damaged.
    """
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        records = {}
        for record in archive.infolist():
            if record.compress_type != zipfile.ZIP_STORED:
                raise DeclaredShapeError(f"record {record.filename} is compressed; torch.save never does that")
            if record.header_offset + record.file_size > size:
                raise DeclaredShapeError(f"record {record.filename} runs past the end of the file")
            records[record.filename] = record.file_size
        pickles = [name for name in records if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise DeclaredShapeError(f"expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        data = archive.read(pickles[0])
    check_opcodes(data)
    return _MetaUnpickler(io.BytesIO(data), records, prefix).load()


def check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without running them; refuse memo indices beyond the entries
    stored so far and frames longer than the pickle (both make CPython allocate by the number)."""
    stored = 0
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "MEMOIZE":
                stored += 1
            elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not 0 <= int(argument) <= stored:
                    raise DeclaredShapeError(f"the pickle stores memo entry {argument} after {stored} entries")
                stored += 1
            elif opcode.name == "FRAME" and argument > len(data):
                raise DeclaredShapeError(f"a pickle frame of {argument} bytes in a pickle of {len(data)}")
    except (ValueError, TypeError) as error:
        if isinstance(error, DeclaredShapeError):
            raise
        raise DeclaredShapeError(f"the pickle is malformed ({error})") from None


class _MetaUnpickler(safe_pickle.Unpickler):
    """:class:`safe_pickle.Unpickler` whose tensors are ``meta`` tensors checked against the archive."""

    def __init__(self, stream: io.BytesIO, records: dict[str, int], prefix: str) -> None:
        super().__init__(stream)
        self._records, self._prefix = records, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        if module == "torch._utils" and name in _REBUILDERS:
            return _REBUILDERS[name]
        return super().find_class(module, name)

    def persistent_load(self, saved_id: Any) -> _Storage:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise DeclaredShapeError(f"unknown persistent id {str(saved_id)[:60]}")
        _, storage_type, key, _location, numel = saved_id
        dtype = storage_type.dtype if isinstance(storage_type, torch.serialization.StorageType) else storage_type
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise DeclaredShapeError(f"storage {key!r} has no valid dtype or size")
        record = f"{self._prefix}data/{key}"
        needed = numel * _itemsize(dtype)
        if record not in self._records:
            raise DeclaredShapeError(f"storage {key!r} is declared but not in the file")
        if self._records[record] < needed:
            raise DeclaredShapeError(f"storage {key!r} declares {needed} bytes, the file holds "
                                     f"{self._records[record]}")
        return _Storage(dtype, numel)


def _meta_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise DeclaredShapeError("a tensor without a storage record")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)):
        raise DeclaredShapeError(f"a tensor declares an invalid shape {size} or stride {stride}")
    numel = 1
    for extent in size:
        numel *= extent
    reach = offset + sum((extent - 1) * step for extent, step in zip(size, stride)) + 1 if numel else 0
    if numel > storage.numel or reach > storage.numel:
        raise DeclaredShapeError(f"a tensor of shape {size} does not fit its storage of {storage.numel} values")
    return torch.empty_strided(size, stride, dtype=storage.dtype, device="meta")


def _meta_parameter(data: Any, *_: Any) -> Any:
    return data


_REBUILDERS = {
    "_rebuild_tensor": _meta_tensor,
    "_rebuild_tensor_v2": _meta_tensor,
    "_rebuild_parameter": _meta_parameter,
    "_rebuild_parameter_with_state": _meta_parameter,
}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()
