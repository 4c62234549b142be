"""Source-file signatures: how a feature store knows that a scan changed after extraction.

A signature is a file's size, modification time (ns) and a fast content hash (xxh3-128 of
the whole file). Comparing a recorded signature with the file now is cheap when nothing
changed: size and mtime are compared first and the file is hashed again only when one of
them differs, so a file that was touched but not changed (copied back, ``touch``) still
counts as unchanged.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from medfeat.errors import InputError

HASH_NAME = "xxh3_128"
_READ_BLOCK = 4 << 20
_HASH_THREADS = 4  # xxhash releases the GIL on large buffers: a few files hash at once


@dataclass(frozen=True)
class FileSignature:
    """``path`` (absolute), ``size`` (bytes), ``mtime_ns`` and ``digest`` (``xxh3_128:<hex>``)."""

    path: str
    size: int
    mtime_ns: int
    digest: str

    def to_list(self) -> list[str | int]:
        return [self.path, self.size, self.mtime_ns, self.digest]

    @classmethod
    def from_list(cls, row: list) -> FileSignature:
        path, size, mtime, digest = row
        return cls(str(path), int(size), int(mtime), str(digest))


def file_digest(path: str | Path) -> str:
    """``xxh3_128:<hex>`` of the file's bytes."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK):
            h.update(block)
    return f"{HASH_NAME}:{h.hexdigest()}"


def file_signature(path: str | Path) -> FileSignature | None:
    """The signature of the file at ``path`` now; None when there is no such file."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink loop, a permission error: the read will say it again
        raise InputError(f"{p}: cannot stat ({os.strerror(exc.errno or 0) or exc})") from exc
    if not p.is_file():
        return None
    return FileSignature(str(p.resolve()), st.st_size, st.st_mtime_ns, file_digest(p))


def change_of(old: FileSignature, path: str | Path) -> str | None:
    """Why the file at ``path`` differs from ``old`` (None: the same file, same content).

    Reasons: ``path changed (was ...)``, ``missing``, ``content changed``. Unchanged size
    and mtime are taken as unchanged content (the file is not read).
    """
    p = Path(path)
    try:
        real = str(p.resolve())
        st = p.stat()
    except OSError:
        return "missing"
    if real != old.path:
        return f"path changed (was {old.path})"
    if st.st_size == old.size and st.st_mtime_ns == old.mtime_ns:
        return None
    if st.st_size != old.size:
        return "content changed"
    return None if file_digest(p) == old.digest else "content changed"


def signatures(paths: Iterable[str]) -> dict[str, FileSignature | None]:
    """Signatures of many files, hashed a few at a time; missing files map to None."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(unique, pool.map(file_signature, unique)))


def encode(sigs: Iterable[FileSignature | None]) -> str:
    """The items-table text of one item's source signatures (JSON list; missing files skipped)."""
    return json.dumps([s.to_list() for s in sigs if s is not None], separators=(",", ":"))


def decode(text: str) -> list[FileSignature]:
    """Inverse of :func:`encode`; an empty text (a store made before signatures) is []."""
    if not text:
        return []
    return [FileSignature.from_list(row) for row in json.loads(text)]
