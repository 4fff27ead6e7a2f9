"""Atomic file writes, the one way every result, report, prediction, cache entry and checkpoint is written.

The bytes go to a temporary file in the target's directory, which is flushed to disk and renamed over the
target: a reader sees the old file or the new one, never a torn one, and a failed write leaves the old file.
The temporary file is created with mode 0666 less the process umask, as `open(path, "w")` would (unlike
`tempfile.mkstemp`, whose 0600 would make every result readable by its owner only).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write_to: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call `write_to(f)` on a binary file that becomes `path` once it returns. `durable=False` skips the fsync:
    for cache entries, which a reader that finds them torn after a crash recomputes (one fsync per cached image
    feature cost more than the feature on network storage)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # unique: processes may write one file at once
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            write_to(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` as UTF-8, newlines as given (no platform translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_stamp(path: str | Path) -> str:
    """"size:mtime_ns" of a file, or "missing": what keys work on a file (a retrieval-set chunk, a memo of its
    pixels, a model directory's state) so that a rewritten file is seen as another."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def save_pretrained(part, directory: str | Path) -> None:
    """`part.save_pretrained(directory)` (a Hugging Face model or processor), its files then given the mode any
    new file there gets: safetensors writes weights 0600 whatever the umask."""
    directory = Path(directory)
    part.save_pretrained(str(directory))
    mode = new_file_mode(directory)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, mode)


def new_file_mode(directory: str | Path) -> int:
    """The permission bits a file created in `directory` gets: 0666 less the umask (or as a default ACL says),
    found by creating one, since reading the umask means setting it, which races other threads."""
    probe = Path(directory) / f".mode-probe-{secrets.token_hex(6)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
        probe.unlink()
