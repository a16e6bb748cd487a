"""The on-disk summary format: its name and version, and the checks that run on a folder
before (and while) any of its data is read, so a forged or corrupt folder is refused quickly,
with bounded memory, and without listing what it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from optax_selective.summary.types import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SummaryFormatError,
    SummaryLeaf,
)

FORMAT_NAME = "optax_selective.SparseSummary"
FORMAT_VERSION = 2  # 2: digests cover key, shape and dtype too; version 1 folders still load
READABLE_VERSIONS = (1, 2)
MAX_JSON_BYTES = 64 * 2**20
_MAX_ZARRAY_BYTES = 64 * 2**10
_MAX_CHUNKS = 4096
_ZARR_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "bfloat16",
                "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
                "int32": "<i4", "int64": "<i8"}


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def not_replaceable(path: str) -> str | None:
    """Why ``save_summary(overwrite=True)`` must not replace what is at ``path`` (None: it is
    a summary folder). Never lists what the folder holds.

    Example:
      >>> import tempfile
      >>> from optax_selective.summary import _format
      >>> "not an optax_selective summary" in _format.not_replaceable(tempfile.mkdtemp())
      True
    """
    refuse = (f"{path} exists and is not an optax_selective summary folder; overwrite=True "
              "only replaces summaries. Remove it yourself or choose another path.")
    if os.path.islink(path) or not os.path.isdir(path):
        return refuse
    try:
        meta = read_json(path)
    except SummaryFormatError:
        return refuse
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return refuse
    return None


def format_error(path: str, why: str) -> SummaryFormatError:
    """The error for a folder that is not a valid summary, naming the path and the reason.

    Example:
      >>> from optax_selective.summary import _format
      >>> str(_format.format_error("/s", "no metadata"))
      '/s is not a valid optax_selective summary: no metadata'
    """
    return SummaryFormatError(f"{path} is not a valid optax_selective summary: {why}")


def short_error(e: Exception, limit: int = 200) -> str:
    """The first line of ``e``'s message, at most ``limit`` characters: orbax and tensorstore
    messages can quote paths and file listings.

    Example:
      >>> from optax_selective.summary import _format
      >>> _format.short_error(OSError("bad chunk"))
      'OSError: bad chunk'
    """
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _inside(root: str, p: str) -> bool:
    real = os.path.realpath(p)
    return real == root or real.startswith(root + os.sep)


def regular_file(path: str, rel: str, limit: int) -> bytes:
    """The bytes of ``path/rel``: a regular file inside the folder, at most ``limit`` bytes.

    Example:
      >>> import os, tempfile
      >>> from optax_selective.summary import _format
      >>> root = tempfile.mkdtemp()
      >>> _ = open(os.path.join(root, "f"), "wb").write(b"hi")
      >>> _format.regular_file(root, "f", 10)
      b'hi'
    """
    f = os.path.join(path, rel)
    if not os.path.lexists(f):
        raise FileNotFoundError(rel)
    if not _inside(os.path.realpath(path), f) or not os.path.isfile(f):
        raise format_error(path, f"{rel} is not a regular file inside the summary folder")
    size = os.path.getsize(f)
    if size > limit:
        raise format_error(path, f"{rel} has {size} bytes (at most {limit} expected)")
    with open(f, "rb") as fh:
        return fh.read(limit + 1)


def read_json(path: str) -> Any:
    """The folder's ``metadata/metadata`` JSON (bounded size), or a ``SummaryFormatError``.

    Example:
      >>> import tempfile
      >>> from optax_selective.summary import _format
      >>> try:
      ...     _format.read_json(tempfile.mkdtemp())
      ... except _format.SummaryFormatError as e:
      ...     print(str(e).split(": ")[1])
      could not read its metadata (no metadata/metadata file)
    """
    try:
        raw = regular_file(path, os.path.join("metadata", "metadata"), MAX_JSON_BYTES)
    except FileNotFoundError:
        raise format_error(path, "could not read its metadata (no metadata/metadata file)") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise format_error(path, f"its metadata is not valid JSON ({e})") from None


def check_meta(path: str, meta: Any) -> dict:
    """``meta`` if it is a well-formed summary metadata object, else a ``SummaryFormatError``.

    Example:
      >>> from optax_selective.summary import _format
      >>> meta = {"format": _format.FORMAT_NAME, "format_version": 2, "method": "pafi",
      ...         "version": "0", "budget_used": 0, "leaves": []}
      >>> _format.check_meta("/s", meta)["method"]
      'pafi'
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise format_error(path, f"its metadata does not say format {FORMAT_NAME!r}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise format_error(
            path,
            f"format_version {meta.get('format_version')!r} is not supported (this library "
            f"reads versions {list(READABLE_VERSIONS)}); upgrade optax-selective.",
        )
    fields = {"method": str, "version": str, "budget_used": int, "leaves": list}
    for name, typ in fields.items():
        if not isinstance(meta.get(name), typ):
            raise format_error(path, f"metadata field {name!r} is missing or not a {typ.__name__}")
    leaf_fields = {
        "key": str,
        "shape": list,
        "dtype": str,
        "index_dtype": str,
        "count": int,
        "sha256": str,
    }
    names = set()
    for j, leaf in enumerate(meta["leaves"]):
        if not isinstance(leaf, dict):
            raise format_error(path, f"metadata leaf {j} is not an object")
        for name, typ in leaf_fields.items():
            if not isinstance(leaf.get(name), typ):
                raise format_error(
                    path, f"metadata leaf {j} field {name!r} is missing or not a {typ.__name__}"
                )
        if leaf["dtype"] not in FLOAT_DTYPES or leaf["index_dtype"] not in INDEX_DTYPES:
            raise format_error(
                path,
                f"leaf {leaf['key']}: unsupported dtype {leaf['dtype']!r} or index "
                f"dtype {leaf['index_dtype']!r}",
            )
        shape = leaf["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise format_error(path, f"leaf {leaf['key']}: shape {shape!r} is not a list of ints >= 0")
        if not 0 <= leaf["count"] <= _size(shape):
            raise format_error(path, f"leaf {leaf['key']}: count {leaf['count']} does not fit shape "
                             f"{shape}")
        if leaf["count"] > 0:
            name = leaf.get("array")
            if not (isinstance(name, str) and len(name) <= 32 and name.startswith("leaf_")
                    and name[5:].isdigit()) or name in names:
                raise format_error(path, f"leaf {leaf['key']}: has {leaf['count']} entries but no "
                                 "valid array name of its own")
            names.add(name)
    return meta


def check_stored_array(path: str, rel: str, count: int, dtype: str) -> None:
    """Checks the zarr metadata of one stored array against the (digest-covered) JSON before
    orbax reads it, so a forged file cannot make the reader allocate more than the JSON
    declares (``count`` entries, itself at most the leaf's size).

    Example:
      >>> import json, os, tempfile
      >>> from optax_selective.summary import _format
      >>> root = tempfile.mkdtemp(); os.mkdir(os.path.join(root, "a"))
      >>> zarray = {"shape": [3], "chunks": [3], "dtype": "<f4"}
      >>> _ = open(os.path.join(root, "a", ".zarray"), "w").write(json.dumps(zarray))
      >>> _format.check_stored_array(root, "a", 3, "float32")  # as declared: no error
    """
    try:
        raw = regular_file(path, os.path.join(rel, ".zarray"), _MAX_ZARRAY_BYTES)
        zarray = json.loads(raw)
    except FileNotFoundError:
        raise format_error(path, f"could not read its arrays ({rel} has no .zarray)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise format_error(path, f"could not read its arrays ({rel}/.zarray is not JSON)") from None
    if not isinstance(zarray, dict):
        raise format_error(path, f"could not read its arrays ({rel}/.zarray is not an object)")
    shape, chunks = zarray.get("shape"), zarray.get("chunks")
    if shape != [count]:
        raise format_error(path, f"leaf array {rel}: expected {count} entries, its stored array has "
                         f"shape {str(shape)[:40]}")
    if not (isinstance(chunks, list) and len(chunks) == 1 and isinstance(chunks[0], int)
            and 0 < chunks[0] <= max(count, 1) and -(-count // chunks[0]) <= _MAX_CHUNKS):
        raise format_error(path, f"leaf array {rel}: stored in chunks {str(chunks)[:40]}, expected at "
                         f"most {_MAX_CHUNKS} chunks of its {count} entries")
    if zarray.get("dtype") != _ZARR_DTYPES[dtype]:
        raise format_error(path, f"leaf array {rel}: stored dtype {str(zarray.get('dtype'))[:20]!r}, "
                         f"the metadata says {dtype}")
    for c in range(-(-count // chunks[0])):
        chunk = os.path.join(path, rel, str(c))
        if os.path.lexists(chunk) and (
                not _inside(os.path.realpath(path), chunk) or not os.path.isfile(chunk)):
            raise format_error(path, f"{rel}/{c} is not a regular file inside the summary folder")


def check_links(path: str, limit: int) -> None:
    """Refuses symbolic links that leave the folder; walks at most ``limit`` entries.

    Example:
      >>> import tempfile
      >>> from optax_selective.summary import _format
      >>> _format.check_links(tempfile.mkdtemp(), 10)  # nothing inside: no error
    """
    root, seen = os.path.realpath(path), 0
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            seen += 1
            if seen > limit:
                raise format_error(path, f"it holds more than {limit} files")
            p = os.path.join(folder, name)
            if os.path.islink(p) and not _inside(root, p):
                rel = os.path.relpath(p, path)
                raise format_error(path, f"{rel} is a symbolic link out of the summary folder")



def digest_v1(leaf: SummaryLeaf) -> str:
    """The SHA-256 that format_version 1 files recorded: the indices and values bytes only.

    Example:
      >>> import numpy as np
      >>> from optax_selective.summary import SummaryLeaf, _format
      >>> leaf = SummaryLeaf("['w']", (2,), np.float32, np.array([1], np.int32), np.array([3.0], np.float32))
      >>> len(_format.digest_v1(leaf))
      64
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(leaf.indices).tobytes())
    h.update(np.ascontiguousarray(leaf.values).tobytes())
    return h.hexdigest()
