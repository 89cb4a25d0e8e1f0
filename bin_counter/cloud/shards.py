"""WebDataset-style tar shards: write the prepared splits as shards, stream them back from disk or S3.

A shard is a plain tar in WebDataset's layout: for each image `<id>.jpg`, `<id>.cls` (the count) and `<id>.json`
(its manifest row), consecutive. Streaming reads a shard front to back without seeking, so a training set larger
than the disk trains straight from S3, each rank and DataLoader worker reading its own share of the shards.
"""
from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bin_counter import BinCounterError, one_line
from bin_counter.cloud import s3
from bin_counter.core.files import atomic_path, atomic_write_text, unsafe_reason
from bin_counter.core.manifest import SHARD_DIR

log = logging.getLogger(__name__)
INDEX = "index.json"


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same data makes the same shard
    archive.addfile(info, io.BytesIO(data))


def write_shards(data_dir: Path, manifest: pd.DataFrame, shard_size: int) -> dict[str, list[str]]:
    """DATA_DIR/shards/<split>-000000.tar ... and index.json listing them per split."""
    out = Path(data_dir) / SHARD_DIR
    index: dict[str, list[str]] = {}
    for split, rows in manifest.groupby("split", sort=True):
        names = []
        for start in range(0, len(rows), shard_size):
            name = f"{split}-{start // shard_size:06d}.tar"
            with atomic_path(out / name) as tmp, tarfile.open(tmp, "w") as archive:
                for row in rows.iloc[start:start + shard_size].itertuples():
                    _add(archive, f"{row.image_id}.jpg", (Path(data_dir) / row.path).read_bytes())
                    _add(archive, f"{row.image_id}.cls", str(int(row.count)).encode())
                    _add(archive, f"{row.image_id}.json", json.dumps(
                        {"image_id": row.image_id, "count": int(row.count), "sha256": row.sha256}).encode())
            names.append(name)
        index[split] = names
    atomic_write_text(out / INDEX, json.dumps(index, indent=1) + "\n")
    return index


def shard_urls(location: str, split: str) -> list[str]:
    """Shard paths or s3:// URIs of a split, from DATA_DIR/shards/index.json (local or in S3)."""
    base = location.rstrip("/") + "/" + SHARD_DIR
    if location.startswith("s3://"):
        bucket, prefix = s3.parse_s3_uri(base)
        client = s3.make_client(s3.is_anonymous(bucket, None))
        try:
            index = json.loads(client.get_object(Bucket=bucket, Key=prefix + INDEX)["Body"].read())
        except Exception as exc:
            raise BinCounterError(f"no shard index at {base}/{INDEX}: {one_line(exc)}") from None
    else:
        path = Path(base) / INDEX
        if not path.exists():
            raise BinCounterError(f"no shards in {location}: run `bin-counter prepare --shard-size N` first")
        index = json.loads(path.read_text())
    if not index.get(split):
        raise BinCounterError(f"no {split} shards in {base}")
    return [f"{base}/{name}" for name in index[split]]


def _open(url: str):
    if url.startswith("s3://"):
        bucket, key = url[5:].split("/", 1)
        client = s3.make_client(s3.is_anonymous(bucket, None))
        return client.get_object(Bucket=bucket, Key=key)["Body"]  # a stream: nothing lands on disk
    return open(url, "rb")


# What a sample's members may be called after its id; anything else in a shard is skipped.
MEMBER_EXTENSIONS = ("jpg", "cls", "json")
# A bin photo is ~50 kB; a member past this is not one of ours, and reading it would fill memory.
MAX_MEMBER_BYTES = 64 << 20


def split_member_name(name: str) -> tuple[str, str]:
    """`a.b.jpg` -> (`a.b`, `jpg`): the extension is after the LAST dot, so dotted ids keep their samples whole."""
    key, dot, ext = name.rpartition(".")
    return (key, ext) if dot else (name, "")


def member_problem(member: tarfile.TarInfo, key: str, ext: str) -> str | None:
    """Why a tar member is not a sample part we read, or None. Ids become file names (train's example images),
    so a name with a folder, `..` or an absolute path is refused here, before anyone joins it to a folder."""
    if not member.isfile():
        return "not a regular file"
    if ext not in MEMBER_EXTENSIONS:
        return f"unknown extension {ext!r}"
    reason = unsafe_reason(key) or ("name has a folder" if "/" in key else None)
    if reason:
        return reason
    if member.size > MAX_MEMBER_BYTES:
        return f"{member.size:,} bytes, over the {MAX_MEMBER_BYTES:,}-byte limit"
    return None


def parse_cls(data: bytes) -> int:
    """The count in a `.cls` member, or ValueError saying why it is not one."""
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit() or len(text) > 6:
        raise ValueError(f"count {text[:20]!r} is not a small non-negative integer")
    return int(text)


def samples(url: str) -> Iterator[dict]:
    """{'image_id', 'jpg': bytes, 'count': int} for each sample of one shard, read sequentially.

    Members that are not ours are skipped with a logged reason; a sample whose count does not parse is skipped
    whole; a shard that breaks off (truncated, corrupt) ends there with a warning instead of a traceback."""
    current: dict = {}
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                key, ext = split_member_name(member.name)
                problem = member_problem(member, key, ext)
                if problem:
                    log.warning("skipping %r in %s: %s", member.name, url, problem)
                    continue
                if current and key != current["image_id"]:
                    yield from _complete(current, url)
                    current = {}
                current["image_id"] = key
                data = archive.extractfile(member).read()
                if ext == "jpg":
                    current["jpg"] = data
                elif ext == "cls":
                    try:
                        current["count"] = parse_cls(data)
                    except ValueError as exc:
                        current["bad"] = str(exc)
    except tarfile.TarError as exc:
        log.warning("shard %s is unreadable after %r: %s; skipping the rest of it", url, current.get("image_id"), exc)
        return
    if current:
        yield from _complete(current, url)


def _complete(sample: dict, url: str) -> Iterator[dict]:
    """The sample if it has an image and a count, else a logged skip."""
    missing = [part for part in ("jpg", "count") if part not in sample]
    if "bad" in sample or missing:
        log.warning("skipping %s in %s: %s", sample["image_id"], url, sample.get("bad") or f"no .{missing[0]}")
        return
    yield sample


class ShardStream(IterableDataset):
    """(image, label index, position) streamed from shards; shards are split across ranks and workers, and a
    seeded shuffle buffer mixes samples across shards in training."""

    def __init__(self, urls: list[str], classes: list[int], transform, shuffle: bool = False, seed: int = 0,
                 buffer: int = 256):
        self.urls, self.transform, self.shuffle, self.seed, self.buffer = urls, transform, shuffle, seed, buffer
        self.index = {count: i for i, count in enumerate(classes)}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_urls(self) -> list[str]:
        """This reader's shards: training shards are split across ranks and workers; an evaluation stream is
        split across the workers only, so every rank scores the whole split (metrics of a share would be that
        share's, and a rank with no shard of a small split would have nothing to score)."""
        from bin_counter.core import distributed

        ctx, worker = distributed.current(), get_worker_info()
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(urls)
        ranks, rank = (ctx.world, ctx.rank) if self.shuffle else (1, 0)
        parts = ranks * (worker.num_workers if worker else 1)
        me = rank * (worker.num_workers if worker else 1) + (worker.id if worker else 0)
        return urls[me::parts]

    def _decoded(self) -> Iterator[tuple]:
        from bin_counter.core.data import open_image

        position = 0
        for url in self._my_urls():
            for sample in samples(url):
                if sample["count"] not in self.index:
                    log.warning("skipping %s in %s: count %s is not one of the classes %s", sample["image_id"], url,
                                sample["count"], list(self.index))
                    continue
                try:
                    image = open_image(sample["jpg"])
                except ValueError as exc:
                    log.warning("skipping %s in %s: %s", sample["image_id"], url, exc)
                    continue
                yield self.transform(image), self.index[sample["count"]], position
                position += 1

    def __iter__(self):
        if not self.shuffle:
            yield from self._decoded()
            return
        rng, pool = random.Random(self.seed * 7919 + self.epoch), []
        for item in self._decoded():
            pool.append(item)
            if len(pool) >= self.buffer:
                yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool


def stream_collate(batch):
    images, labels, positions = zip(*batch)
    return torch.stack(images), torch.tensor(labels), torch.tensor(positions)


