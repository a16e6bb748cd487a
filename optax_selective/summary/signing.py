"""Optional signatures for summary files and folders (JAX and torch summaries, adapter folders).

The SHA-256 digests inside a summary detect corruption, but whoever edits a summary can
recompute them. A signature made with a key the editor does not have detects the edit:

* **HMAC-SHA256** with a shared secret (``key=b"..."``, at least 16 bytes): whoever holds the
  secret can sign *and* verify. It proves the file was signed by a holder of the secret
  (integrity and authenticity within the group that shares it), not which one.
* **Ed25519** (through the optional ``cryptography`` package, ``pip install
  optax-selective[signing]``): sign with an ``Ed25519PrivateKey``, verify with its
  ``Ed25519PublicKey``. Whoever has only the public key can verify but not sign, so a
  verified file was signed by the private key's holder.

:func:`sign` writes the signature next to what it signs, ``PATH.sig`` (a small JSON file: the
algorithm, the SHA-256 of every file, relative path by relative path, and the signature over
that list); :func:`verify_signature` hashes the files again and checks the list and the
signature. Neither kind hides anything (summaries are not encrypted), and a signature says
nothing about whether the values are good: only who signed them. A signed summary can be
replayed (an older signed summary stays valid); a check and a later read are two reads, so a
writer racing the reader in the same folder is outside what a signature covers.

Example:
  >>> import os, tempfile
  >>> folder = tempfile.mkdtemp()
  >>> path = os.path.join(folder, "summary.safetensors")
  >>> with open(path, "wb") as f:
  ...     _ = f.write(b"the summary's bytes")
  >>> key = b"a shared secret of 16+ bytes"
  >>> sig = sign(path, key)
  >>> os.path.basename(sig)
  'summary.safetensors.sig'
  >>> verify_signature(path, key)  # no error: signed with this key, unchanged
  >>> with open(path, "ab") as f:
  ...     _ = f.write(b"!")
  >>> try:
  ...     verify_signature(path, key)
  ... except SignatureError as e:
  ...     print(str(e).replace(folder, "<folder>"))
  <folder>/summary.safetensors changed after it was signed (its SHA-256 differs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from optax_selective.summary.atomic import atomic_write_bytes

__all__ = ["sign", "verify_signature", "signature_path", "key_algorithm", "SignatureError"]

FORMAT = "optax_selective.signature"
MAX_SIGNATURE_BYTES = 16 * 2**20  # a manifest of up to ~100,000 files
MAX_FILES = 100_000
MIN_SECRET_BYTES = 16
_CHUNK = 2**20


class SignatureError(ValueError):
    """A signature is missing, malformed, made with another key, or the files changed.

    Example:
      >>> issubclass(SignatureError, ValueError)
      True
    """


def signature_path(path: str | os.PathLike) -> str:
    """Where :func:`sign` puts the signature of ``path`` (a file or a folder): ``PATH.sig``.

    Example:
      >>> signature_path("runs/summary")
      'runs/summary.sig'
    """
    return os.fspath(path).rstrip(os.sep) + ".sig"


def key_algorithm(key: Any, signing: bool = False) -> str:
    """``"hmac-sha256"`` or ``"ed25519"``: what ``key`` signs or verifies with; raises
    ``TypeError`` / ``ValueError`` for a key that cannot (``signing=True``: a key that signs).

    Example:
      >>> key_algorithm(b"0123456789abcdef")
      'hmac-sha256'
    """
    if isinstance(key, (bytes, bytearray)):
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"an HMAC secret needs at least {MIN_SECRET_BYTES} bytes, got "
                             f"{len(key)}; use e.g. os.urandom(32).")
        return "hmac-sha256"
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        ed25519 = None
    if ed25519 is not None:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return "ed25519"
        if isinstance(key, ed25519.Ed25519PublicKey):
            if signing:
                raise TypeError("signing needs the Ed25519PrivateKey; the public key only "
                                "verifies.")
            return "ed25519"
    raise TypeError(
        f"key must be bytes (an HMAC-SHA256 secret) or a cryptography Ed25519 key, got "
        f"{type(key).__name__}" + ("" if ed25519 is not None else
                                   " (Ed25519 needs: pip install optax-selective[signing])") + ".")


def _files(path: str) -> list[tuple[str, str]]:
    """``(relative path, absolute path)`` of every regular file under ``path``, sorted;
    symbolic links are refused (they could point anywhere)."""
    if os.path.islink(path):
        raise SignatureError(f"{path} is a symbolic link; sign or verify the real path.")
    if os.path.isfile(path):
        return [(".", path)]  # a file's own name is not signed: it may be renamed
    if not os.path.isdir(path):
        raise FileNotFoundError(f"nothing to sign or verify at {path}")
    out = []
    for root, dirs, names in os.walk(path):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                raise SignatureError(f"{os.path.join(root, d)} is a symbolic link inside {path}; "
                                     "signed folders hold regular files only.")
        for n in names:
            full = os.path.join(root, n)
            if os.path.islink(full) or not os.path.isfile(full):
                raise SignatureError(f"{full} is not a regular file inside {path}; signed "
                                     "folders hold regular files only.")
            out.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
            if len(out) > MAX_FILES:
                raise SignatureError(f"{path} holds more than {MAX_FILES} files.")
    return sorted(out)


def _manifest(path: str) -> dict[str, str]:
    out = {}
    for rel, full in _files(path):
        h = hashlib.sha256()
        with open(full, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def _message(algorithm: str, kind: str, manifest: dict[str, str]) -> bytes:
    return json.dumps({"format": FORMAT, "algorithm": algorithm, "kind": kind,
                       "files": manifest}, sort_keys=True, separators=(",", ":")).encode()


def sign(path: str | os.PathLike, key: Any, *, signature: str | os.PathLike | None = None
         ) -> str:
    """Signs the file or folder ``path`` with ``key``; returns the signature's path.

    Args:
      path: a summary file (torch), a summary folder (JAX) or any folder of files (e.g. an
        adapter folder); every regular file under a folder is covered.
      key: ``bytes`` (an HMAC-SHA256 shared secret, at least 16 bytes) or an
        ``Ed25519PrivateKey`` from ``cryptography``.
      signature: where to write the signature; default :func:`signature_path` (``PATH.sig``).
        Written atomically.

    Raises:
      TypeError: for a key of another type (or an Ed25519 public key).
      SignatureError: if a folder holds a symbolic link or something that is not a file.

    Example:
      >>> import os, tempfile
      >>> folder = tempfile.mkdtemp()
      >>> for name in ("config.json", "summary.safetensors"):
      ...     with open(os.path.join(folder, name), "w") as f:
      ...         _ = f.write(name)
      >>> sig = sign(folder, b"0123456789abcdef")
      >>> sorted(json.load(open(sig))["files"])
      ['config.json', 'summary.safetensors']
    """
    path = os.fspath(path)
    algorithm = key_algorithm(key, signing=True)
    kind = "file" if os.path.isfile(path) else "folder"
    manifest = _manifest(path)
    message = _message(algorithm, kind, manifest)
    if algorithm == "hmac-sha256":
        mac = hmac.new(bytes(key), message, hashlib.sha256).hexdigest()
    else:
        mac = key.sign(message).hex()
    out = os.fspath(signature) if signature is not None else signature_path(path)
    body = {"format": FORMAT, "version": 1, "algorithm": algorithm, "kind": kind,
            "files": manifest, "signature": mac}
    atomic_write_bytes(out, json.dumps(body, indent=1, sort_keys=True).encode())
    return out


def verify_signature(path: str | os.PathLike, key: Any, *,
                     signature: str | os.PathLike | None = None) -> None:
    """Checks that ``path`` (a file or folder) is exactly what was signed with ``key``.

    Args:
      path: what :func:`sign` signed.
      key: the HMAC secret (``bytes``), or the ``Ed25519PublicKey`` (or private key) of the
        signer.
      signature: the signature file; default :func:`signature_path` (``PATH.sig``).

    Raises:
      SignatureError: naming the problem: no signature, a malformed one, another algorithm
        or key, a file added, removed or changed since signing.

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "s.bin")
      >>> open(path, "wb").close()
      >>> _ = sign(path, b"0123456789abcdef")
      >>> try:
      ...     verify_signature(path, b"another key, 16 bytes+")
      ... except SignatureError as e:
      ...     print(str(e).split(" was ")[1])
      not signed with this key (hmac-sha256 signature does not verify).
    """
    path = os.fspath(path)
    sig = os.fspath(signature) if signature is not None else signature_path(path)
    algorithm = key_algorithm(key)
    if not os.path.isfile(sig):
        raise SignatureError(f"{path} has no signature at {sig}; a key was given, so an "
                             "unsigned summary is refused.")
    if os.path.getsize(sig) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{sig} is larger than a signature can be ({MAX_SIGNATURE_BYTES} "
                             "bytes).")
    try:
        with open(sig, "rb") as f:
            body = json.loads(f.read())
    except (ValueError, RecursionError):
        raise SignatureError(f"{sig} is not a signature (not JSON).") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != 1 \
            or not isinstance(body.get("files"), dict) or not isinstance(body.get("signature"), str) \
            or body.get("kind") not in ("file", "folder"):
        raise SignatureError(f"{sig} is not an optax_selective signature (version 1).")
    if body.get("algorithm") != algorithm:
        raise SignatureError(f"{sig} is a {body.get('algorithm')!r} signature, the key given is "
                             f"for {algorithm!r}.")
    kind = "file" if os.path.isfile(path) else "folder"
    message = _message(algorithm, body["kind"], body["files"])
    if algorithm == "hmac-sha256":
        good = hmac.compare_digest(hmac.new(bytes(key), message, hashlib.sha256).hexdigest(),
                                   body["signature"])
    else:
        from cryptography.exceptions import InvalidSignature

        public = key.public_key() if hasattr(key, "public_key") else key
        try:
            public.verify(bytes.fromhex(body["signature"]), message)
            good = True
        except (InvalidSignature, ValueError):
            good = False
    if not good:
        raise SignatureError(f"{path} was not signed with this key ({algorithm} signature does "
                             "not verify).")
    if body["kind"] != kind:
        raise SignatureError(f"{sig} signs a {body['kind']}, {path} is a {kind}.")
    now = _manifest(path)
    signed = body["files"]
    for rel in sorted(set(signed) | set(now)):
        where = path if rel == "." else f"{path}: {rel}"
        if rel not in now:
            raise SignatureError(f"{where} was signed but is missing.")
        if rel not in signed:
            raise SignatureError(f"{where} was added after it was signed.")
        if now[rel] != signed[rel]:
            raise SignatureError(f"{where} changed after it was signed (its SHA-256 differs).")
