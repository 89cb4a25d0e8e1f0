"""Writing files so that an interrupted run never leaves a half-written one behind."""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (no extra disk for 500k images), else copy; atomic either way."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def remove_partial_files(directory: Path) -> int:
    """Delete leftovers of an interrupted run (`.NAME.part-PID`)."""
    removed = 0
    if directory.exists():
        for leftover in directory.rglob(".*.part-*"):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
