"""Writing files so that an interrupted run never leaves a half-written one behind."""
from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Filesystems refuse parts over 255 bytes (ENAMETOOLONG); atomic_path's temporary adds ~45 to the name.
MAX_PART_BYTES = 200


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
    # Unique per writer, not per process: two threads writing the same file must not share (and steal) one
    # temporary. The `.NAME.part-` prefix is what remove_partial_files looks for.
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unsafe_reason(name: str) -> str | None:
    """Why a relative name that came from elsewhere (an S3 key, a tar member, a file-list entry, an image id)
    must not become a path, or None when it is safe to join under a folder."""
    if not isinstance(name, str) or not name:
        return "empty name"
    if "\x00" in name:
        return "name holds a NUL byte"
    if "\\" in name:
        return "name holds a backslash"  # a path separator on Windows: `..\\x` would climb there
    if name.startswith("/"):
        return "absolute name"
    for part in name.split("/"):
        if part == "":
            return "name has an empty part"
        if part in (".", ".."):
            return f"name has a {part!r} part"
        if len(part.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES:
            return f"name has a part longer than {MAX_PART_BYTES} bytes"
    return None


def safe_join(root: Path, name: str) -> Path:
    """`root/name` for a name that came from elsewhere, or ValueError saying why it is refused.

    Refuses absolute names, `..`, `.` and empty parts outright (even where they would stay inside), then checks
    that the resolved path is still below the resolved root, which also catches a symlink inside root that points
    out of it."""
    reason = unsafe_reason(name)
    if reason is not None:
        raise ValueError(f"{reason}: {name!r}")
    root = Path(root)
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"name leads outside {root} (through a symlink): {name!r}")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


FICLONE = 0x40049409  # Linux: share the source's blocks copy-on-write (btrfs, XFS)


def copy_file(src: Path, dst: Path) -> None:
    """An atomic copy, a reflink where the filesystem has them (no extra disk). Never a hard link: that is the
    same file, so an edit of the source would change the copy under its unchanged recorded checksum."""
    with atomic_path(dst) as tmp, open(src, "rb") as source, open(tmp, "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
        except OSError:  # no reflinks here (ext4, tmpfs, across filesystems)
            shutil.copyfileobj(source, target, 1 << 20)


def remove_partial_files(directory: Path) -> int:
    """Delete leftovers of an interrupted run (`.NAME.part-PID`)."""
    removed = 0
    if directory.exists():
        for leftover in directory.rglob(".*.part-*"):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
