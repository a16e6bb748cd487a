"""Saving and loading summaries with orbax-checkpoint.

:func:`save_summary` writes the arrays in an orbax PyTree item with safe names
(``leaf_0000``) and everything else in a JSON item, atomically. :func:`load_summary` reads
only JSON and array data (no pickle, no code), restores onto the host (NumPy) whatever
device saved it, and checks a SHA-256 digest of every leaf (the checks live in
:mod:`optax_selective.summary._format`), so a corrupt or truncated folder raises
:class:`SummaryFormatError` instead of loading wrong values.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from optax_selective.summary import _format, signing
from optax_selective.summary.types import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SparseSummary,
    SummaryFormatError,
    SummaryLeaf,
)


def _abs_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    return os.path.abspath(os.fspath(path))


def _array_name(i: int) -> str:
    return f"leaf_{i:04d}"


def save_summary(
    path: str | os.PathLike, summary: SparseSummary, *, overwrite: bool = False,
    key: Any = None,
) -> None:
    """Writes ``summary`` to the folder ``path`` with orbax-checkpoint, atomically.

    Leaves with no entries are kept in the JSON metadata only (orbax refuses zero-size
    arrays). Path keys live in the JSON; the arrays get safe names ``leaf_0000``, ...

    The folder is written under a temporary name next to ``path`` (``.NAME.optax-selective-
    tmp-*``), flushed to disk, and then moved to ``path``; an existing summary there is
    swapped out in one atomic step (Linux ``renameat2``) and deleted. So a reader, or a crash
    at any point, sees the old summary or the new one, never a mix or nothing, and of two
    concurrent writers the last to finish wins. With several JAX processes, call it in every
    process (as orbax requires): they write one temporary folder and process 0 moves it.

    Args:
      path: folder to create; it must not exist unless ``overwrite=True``.
      summary: the summary to write.
      overwrite: replace an existing summary folder. Anything else at ``path`` (a file, a
        folder that is not a summary) is never replaced: ``FileExistsError``.
      key: optionally sign the folder (:func:`optax_selective.sign`, ``PATH.sig``): an
        HMAC-SHA256 secret (``bytes``) or an Ed25519 private key. Process 0 signs.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> s = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> path = os.path.join(tempfile.mkdtemp(), "summary")
      >>> osel.save_summary(path, s)
      >>> osel.load_summary(path).leaves[0].indices.tolist()
      [1]
    """
    import secrets
    import shutil

    import orbax.checkpoint as ocp

    from optax_selective.summary.atomic import fsync_tree, replace_dir, temp_sibling

    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    if key is not None:
        signing.key_algorithm(key, signing=True)  # refuse an unusable key before writing
    path = _abs_path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        why = _format.not_replaceable(path)
        if why:
            raise FileExistsError(why)
    meta_leaves, arrays = [], {}
    for i, leaf in enumerate(summary.leaves):
        name = _array_name(i) if leaf.indices.size else None
        if name is not None:
            arrays[name] = {"indices": leaf.indices, "values": leaf.values}
        meta_leaves.append(
            {
                "key": leaf.key,
                "shape": list(leaf.shape),
                "dtype": leaf.dtype.name,
                "index_dtype": leaf.indices.dtype.name,
                "count": int(leaf.indices.size),
                "array": name,
                "sha256": leaf.digest(),
            }
        )
    meta = {
        "format": _format.FORMAT_NAME,
        "format_version": _format.FORMAT_VERSION,
        "method": summary.method,
        "version": summary.version,
        "budget_used": summary.budget_used,
        "leaves": meta_leaves,
    }
    items = {"metadata": ocp.args.JsonSave(meta)}
    if arrays:
        items["arrays"] = ocp.args.PyTreeSave(arrays)
    if jax.process_count() == 1:
        tmp = temp_sibling(path)
        try:
            with _checkpointer() as ckptr:
                ckptr.save(tmp, ocp.args.Composite(**items))
            fsync_tree(tmp)
            replace_dir(tmp, path, overwrite=overwrite, is_replaceable=_format.not_replaceable)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        if key is not None:
            signing.sign(path, key)
        return
    # Several JAX processes: orbax's save is collective, so every process writes into one
    # temporary folder (a name process 0 draws), then process 0 alone moves it into place.
    from jax.experimental import multihost_utils

    token = multihost_utils.broadcast_one_to_all(np.asarray(secrets.randbits(31), np.int32))
    tmp = temp_sibling(path, token=f"jax-{int(token):08x}")
    try:
        with _checkpointer() as ckptr:
            ckptr.save(tmp, ocp.args.Composite(**items))
        if jax.process_index() == 0:
            fsync_tree(tmp)
            replace_dir(tmp, path, overwrite=overwrite, is_replaceable=_format.not_replaceable)
            if key is not None:
                signing.sign(path, key)
    finally:
        if jax.process_index() == 0 and os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        multihost_utils.sync_global_devices(f"optax_selective.save_summary {tmp}")


def _checkpointer():
    import orbax.checkpoint as ocp

    # Plain zarr arrays (no OCDBT): OCDBT keeps a second copy of the data per process, which
    # would double a summary's bytes on disk.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    arrays = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    registry.add("arrays", ocp.args.PyTreeSave, arrays)
    registry.add("arrays", ocp.args.PyTreeRestore, arrays)
    meta = ocp.JsonCheckpointHandler()
    registry.add("metadata", ocp.args.JsonSave, meta)
    registry.add("metadata", ocp.args.JsonRestore, meta)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def load_summary(path: str | os.PathLike, *, key: Any = None) -> SparseSummary:
    """Reads a summary written by :func:`save_summary`, onto the host (NumPy arrays).

    With ``key`` (the HMAC secret, or the signer's Ed25519 public key) the folder must carry
    a valid signature (``PATH.sig``, see :func:`optax_selective.sign`) over exactly its files,
    checked before anything else is read; otherwise ``SignatureError``.

    Only JSON and array data are read; no code from the folder runs. Works whatever device
    saved the summary. Before any array is read, the JSON metadata is checked and every stored
    array's shape, chunking, dtype and size on disk is compared with it, so a forged folder
    is refused in milliseconds with bounded memory. Then every leaf's SHA-256 (over its key,
    shape, dtype, indices and values), index range and order are checked. Symbolic links out
    of the folder are refused. The returned arrays are read-only.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      SummaryFormatError: (a ``ValueError``) if the folder is corrupt, truncated, forged or not
        a summary, naming the path and what is wrong (never listing what the folder holds).

    A round trip is in :func:`save_summary`'s example.

    Example:
      >>> import optax_selective as osel
      >>> try:
      ...     osel.load_summary("/no/such/summary")
      ... except FileNotFoundError as e:
      ...     print(e)
      no summary folder at /no/such/summary
    """
    path = _abs_path(path)
    if key is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no summary folder at {path}")
        signing.verify_signature(path, key)
    for attempt in range(3):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no summary folder at {path}")
        before = _identity(path)
        try:
            return _load_once(path)
        except SummaryFormatError:
            # A concurrent save_summary swapped a new folder in while this one was read: read
            # the new one (the digests caught the mix).
            if attempt == 2 or _identity(path) == before:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _load_once(path: str) -> SparseSummary:
    import orbax.checkpoint as ocp

    meta = _format.check_meta(path, _format.read_json(path))
    _format.check_links(path, 1024 + 16 * len(meta["leaves"]))
    expected = {}
    for m in meta["leaves"]:
        if m["count"] > 0:
            name = m["array"]
            if not os.path.isdir(os.path.join(path, "arrays", f"{name}.values")):
                raise _format.format_error(path, f"array {name!r} is missing from its arrays folder")
            _format.check_stored_array(path, os.path.join("arrays", f"{name}.indices"), m["count"],
                                m["index_dtype"])
            _format.check_stored_array(path, os.path.join("arrays", f"{name}.values"), m["count"],
                                m["dtype"])
            expected[name] = {
                "indices": ocp.RestoreArgs(restore_type=np.ndarray),
                "values": ocp.RestoreArgs(restore_type=np.ndarray),
            }
    arrays: dict = {}
    if expected:
        try:
            for rel in ("_METADATA", "_CHECKPOINT_METADATA"):
                for where in (os.path.join("arrays", rel), rel):
                    if os.path.lexists(os.path.join(path, where)):
                        _format.regular_file(path, where, _format.MAX_JSON_BYTES)
        except FileNotFoundError:  # pragma: no cover - checked with lexists above
            pass
        with _checkpointer() as ckptr:
            try:
                arrays = ckptr.restore(
                    path,
                    ocp.args.Composite(
                        arrays=ocp.args.PyTreeRestore(item=expected, restore_args=expected)
                    ),
                )["arrays"]
            except Exception as e:
                raise _format.format_error(path, f"could not read its arrays ({_format.short_error(e)})") from e
    leaves = []
    for m in meta["leaves"]:
        dtype, idx_dtype = FLOAT_DTYPES[m["dtype"]], INDEX_DTYPES[m["index_dtype"]]
        if m["count"] > 0:
            try:
                got = arrays[m["array"]]
                idx, vals = np.asarray(got["indices"]), np.asarray(got["values"])
            except (KeyError, TypeError) as e:
                raise _format.format_error(path, f"leaf {m['key']}: array {m['array']!r} is missing") from e
        else:
            idx, vals = np.zeros([0], idx_dtype), np.zeros([0], dtype)
        if idx.shape != (m["count"],) or vals.shape != (m["count"],):
            raise _format.format_error(
                path,
                f"leaf {m['key']}: expected {m['count']} entries, found "
                f"{idx.shape} indices and {vals.shape} values",
            )
        if idx.dtype != idx_dtype or vals.dtype != dtype:
            raise _format.format_error(
                path,
                f"leaf {m['key']}: stored dtypes {idx.dtype.name}/{vals.dtype.name} "
                f"differ from the metadata's {idx_dtype.name}/{dtype.name}",
            )
        try:
            leaf = SummaryLeaf(m["key"], tuple(m["shape"]), dtype, idx, vals)
        except (TypeError, ValueError) as e:
            raise _format.format_error(path, str(e)) from e
        digest = leaf.digest() if meta["format_version"] >= 2 else _format.digest_v1(leaf)
        if digest != m["sha256"]:
            raise _format.format_error(
                path,
                f"leaf {m['key']}: its data or metadata does not match the recorded SHA-256 "
                "(the files were changed or truncated)",
            )
        leaves.append(leaf)
    try:
        return SparseSummary(tuple(leaves), meta["budget_used"], meta["method"], meta["version"])
    except (TypeError, ValueError) as e:
        raise _format.format_error(path, str(e)) from e
