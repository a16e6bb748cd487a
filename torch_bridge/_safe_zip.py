"""Reading ``torch.save`` zip files without ``torch.load``: no code from the file ever runs.

``torch.load`` decides by itself how to open a file: a TorchScript archive goes to
``torch.jit.load`` (whose ``__setstate__`` methods run) before any ``pickle_module`` is used.
So untrusted files are never handed to it. :func:`read_torch_zip` checks the zip's directory
first (only the entries ``torch.save`` writes for plain objects, stored uncompressed, sizes
within the file), then unpickles ``data.pkl`` with :class:`RestrictedUnpickler`, which resolves
a fixed set of globals, and rebuilds each tensor itself from its storage bytes after checking
that the view is dense and inside its storage.

Every refusal raises :class:`torch_bridge._errors.SummaryMismatchError` naming the file.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import re
import sys
import zipfile
from typing import Any

import torch

from torch_bridge._errors import SummaryMismatchError, UnsafeFileError

_LEGACY_CLASS = ("selective_optimizers.load_store", "SelectivePeftSummary")
MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl of a summary refers to tensors; it is small
_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Entries torch.save writes for a plain object (relative to the archive's top folder).
_PLAIN_ENTRIES = {"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment",
                  ".data/serialization_id", ".data/version"}
_DATA_ENTRY = re.compile(r"data/[0-9]{1,12}")


class LegacyRecord:
    """Stand-in for 0.4's ``SelectivePeftSummary``: keeps only the pickled field dict (the
    0.4 class is never imported)."""

    def __setstate__(self, state: Any) -> None:
        self.fields = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Tensor:
    """Marker for the rebuild function; resolved by the unpickler below."""


_ALLOWED: dict[tuple[str, str], Any] = {
    _LEGACY_CLASS: LegacyRecord,
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(dt) for name, dt in _STORAGES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip: only tensors, ``torch.Size``, ``OrderedDict`` and
    0.4's summary record; storages are read from the zip, bounded by their entry's size."""

    def __init__(self, file: Any, *, path: str, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._path, self._zip, self._prefix = path, archive, prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"{self._path} is not a weights-only summary file: refusing to load "
                f"{module}.{name} (a summary needs only tensors and plain values)."
            ) from None
        if found is _Tensor:
            return self._rebuild
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise self._bad(f"malformed storage reference {str(pid)[:80]!r}")
        _, stype, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        entry = f"{self._prefix}data/{key}"
        try:
            info = self._zip.getinfo(entry)
        except KeyError:
            raise self._bad(f"storage {key!r} is missing") from None
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        if numel < 0 or info.file_size != numel * itemsize:
            raise self._bad(
                f"storage {key!r} declares {numel} {stype.dtype} entries but holds "
                f"{info.file_size} bytes"
            )
        raw = bytearray(self._zip.read(info))
        flat = torch.frombuffer(raw, dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
        self._storages[key] = flat
        return flat

    def _rebuild(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                 metadata=None) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor) or not isinstance(offset, int):
            raise self._bad("a tensor does not refer to a storage")
        try:
            size = tuple(int(d) for d in size)
            stride = tuple(int(s) for s in stride)
        except (TypeError, ValueError):
            raise self._bad("a tensor has a malformed size or stride") from None
        if any(d < 0 for d in size) or len(stride) != len(size):
            raise self._bad(f"a tensor has size {size} and stride {stride}")
        n = math.prod(size)
        expected = 1
        for k, st in sorted(((k, st) for k, st in zip(size, stride) if k > 1),
                            key=lambda ks: ks[1]):
            # Dense in some dimension order (mask.nonzero() is saved transposed): no stride 0
            # and no overlap, so a tiny file cannot claim a huge tensor.
            if st != expected:
                raise self._bad(f"a tensor has size {size} and stride {stride}; only dense, "
                                "non-overlapping tensors are accepted")
            expected *= k
        if offset < 0 or offset + n > storage.numel():
            raise self._bad(f"a tensor of {n} entries at offset {offset} exceeds its storage "
                            f"of {storage.numel()}")
        if hooks:
            raise self._bad("a tensor carries backward hooks")
        if n == 0:
            return torch.empty(size, dtype=storage.dtype)
        return torch.as_strided(storage, size, stride, offset).contiguous()

    def _bad(self, why: str) -> SummaryMismatchError:
        return SummaryMismatchError(f"{self._path}: {why}.")


def is_zip(path: Any) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_torch_zip(path: Any) -> Any:
    """See :func:`_read_torch_zip`; any other failure of a damaged file is reported the same
    way, as a ``SummaryMismatchError`` naming the file."""
    try:
        return _read_torch_zip(path)
    except (SummaryMismatchError, MemoryError, FileNotFoundError, PermissionError,
            IsADirectoryError):
        raise
    except Exception as e:  # zipfile raises many types for damaged archives
        raise SummaryMismatchError(
            f"{os.fspath(path)} is a damaged zip archive ({type(e).__name__}: {str(e)[:120]})."
        ) from None


def _read_torch_zip(path: Any) -> Any:
    """The object a plain ``torch.save`` zip holds, read without ``torch.load``.

    Raises:
      SummaryMismatchError: if the file is not such a zip (a TorchScript archive, a
        compressed or inconsistent zip, another pickle format), or names a global outside
        the allowed set (then the subclass ``UnsafeFileError``, also a
        ``pickle.UnpicklingError``).
    """
    name = os.fspath(path)
    size = os.path.getsize(name)
    if not is_zip(name):
        raise SummaryMismatchError(
            f"{name} is not a zip archive as torch.save writes (nor a safetensors summary); "
            "files in torch's pre-1.6 pickle format are not read."
        )
    try:
        archive = zipfile.ZipFile(name)
    except (zipfile.BadZipFile, OSError) as e:
        raise SummaryMismatchError(f"{name} is a broken zip archive ({type(e).__name__}).") from None
    with archive:
        infos = archive.infolist()
        if not infos or "/" not in infos[0].filename:
            raise SummaryMismatchError(f"{name} is not a torch.save archive (no top folder).")
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        total = 0
        for info in infos:
            rel = info.filename[len(prefix):] if info.filename.startswith(prefix) else None
            if rel is None or not (rel in _PLAIN_ENTRIES or _DATA_ENTRY.fullmatch(rel)):
                what = ("a TorchScript archive" if rel is not None and
                        (rel == "constants.pkl" or rel.startswith("code/")) else "not a plain "
                        "torch.save archive")
                raise SummaryMismatchError(
                    f"{name} is {what} (it holds the entry {info.filename[:100]!r}); refused "
                    "without loading it: a summary holds only data."
                )
            if info.compress_type != zipfile.ZIP_STORED:
                raise SummaryMismatchError(
                    f"{name}: entry {info.filename[:100]!r} is compressed; torch.save stores "
                    "entries uncompressed, so the file was not written by it."
                )
            total += info.file_size
        if total > size:
            raise SummaryMismatchError(
                f"{name}: its entries claim {total} bytes but the file has {size}."
            )
        names = {i.filename for i in infos}
        if prefix + "data.pkl" not in names:
            raise SummaryMismatchError(f"{name} is not a torch.save archive (no data.pkl).")
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder")
            if order != sys.byteorder.encode():
                raise SummaryMismatchError(f"{name} was saved with byte order {order[:10]!r}.")
        info = archive.getinfo(prefix + "data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise SummaryMismatchError(f"{name}: data.pkl has {info.file_size} bytes; too large.")
        try:
            with archive.open(info) as f:
                return RestrictedUnpickler(f, path=name, archive=archive, prefix=prefix).load()
        except SummaryMismatchError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, RecursionError, zipfile.BadZipFile, RuntimeError) as e:
            raise SummaryMismatchError(
                f"{name}: its data.pkl is malformed ({type(e).__name__}: {str(e)[:200]})."
            ) from None
