"""Atomic file and folder replacement on the local file system, for the summaries of both
frameworks (orbax folders here, torch files in ``torch_bridge.summary``).

A new file or folder is written under a temporary name in the target's folder (so the final
rename stays on one file system), flushed to disk with fsync, and renamed over the target.
On POSIX ``rename`` of a file is atomic; a folder is swapped in with Linux's
``renameat2(RENAME_EXCHANGE)``, which is atomic too (elsewhere: two renames, see
:func:`replace_dir`). Readers and crashes therefore see the old or the new content, never a
mix, and of concurrent writers the last to rename wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil

TMP_MARK = ".optax-selective-tmp-"


def temp_sibling(path: str, token: str | None = None) -> str:
    """A fresh name next to ``path`` that marks itself as a temporary of this library.

    ``token`` replaces the process id and random part, e.g. one value agreed by every
    process of a multi-process save (they must all write into the same folder).

    Example:
      >>> from optax_selective.summary import atomic
      >>> atomic.temp_sibling("/data/summary", token="1")
      '/data/.summary.optax-selective-tmp-1'
    """
    folder, base = os.path.split(os.path.abspath(path))
    token = f"{os.getpid()}-{secrets.token_hex(4)}" if token is None else token
    return os.path.join(folder, f".{base}{TMP_MARK}{token}")


def fsync_dir(folder: str) -> None:
    """fsync the folder itself, so a rename inside it is on disk (where the platform allows).

    Example:
      >>> import tempfile
      >>> from optax_selective.summary import atomic
      >>> atomic.fsync_dir(tempfile.mkdtemp())
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (a freshly written, small tree).

    Example:
      >>> import tempfile
      >>> from optax_selective.summary import atomic
      >>> atomic.fsync_tree(tempfile.mkdtemp())
    """
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temp file, fsync, rename over ``path``).

    Example:
      >>> import os, tempfile
      >>> from optax_selective.summary import atomic
      >>> path = os.path.join(tempfile.mkdtemp(), "f.bin")
      >>> atomic.atomic_write_bytes(path, b"abc")
      >>> open(path, "rb").read()
      b'abc'
    """
    path = os.path.abspath(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the folders ``a`` and ``b`` (Linux); False where not supported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(new: str, target: str, *, overwrite: bool, is_replaceable) -> None:
    """Moves the finished folder ``new`` to ``target``.

    If ``target`` does not exist, ``new`` is renamed to it (atomic; of two concurrent writers
    the second then finds it and, with ``overwrite``, swaps). If it exists it is replaced only
    when ``overwrite`` and ``is_replaceable(target)`` (else ``FileExistsError``): swapped with
    ``new`` atomically, and the old content (now under the temporary name) deleted. Where the
    atomic swap is unavailable the old folder is first renamed aside, so a crash between the
    two renames leaves it under a temporary name next to ``target``.

    Example:
      >>> import os, tempfile
      >>> from optax_selective.summary import atomic
      >>> root = tempfile.mkdtemp()
      >>> new = atomic.temp_sibling(os.path.join(root, "out"))
      >>> os.mkdir(new)
      >>> atomic.replace_dir(new, os.path.join(root, "out"), overwrite=False, is_replaceable=None)
      >>> os.listdir(root)
      ['out']
    """
    for _ in range(3):
        if not os.path.lexists(target):
            try:
                os.rename(new, target)
                fsync_dir(os.path.dirname(target))
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it.")
        why = is_replaceable(target)
        if why:
            raise FileExistsError(why)
        if _exchange(new, target):
            fsync_dir(os.path.dirname(target))
            shutil.rmtree(new, ignore_errors=True)
            return
        aside = temp_sibling(target)
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(aside, target)
            raise
        fsync_dir(os.path.dirname(target))
        shutil.rmtree(aside, ignore_errors=True)
        return
    raise FileExistsError(f"{target} kept changing while it was being replaced; try again.")
