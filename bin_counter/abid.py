"""Facts about the Amazon Bin Image Dataset: ids, keys, metadata and the study's file_list.json.

ABID ids are strings: `1002` and `01002` are two different bins, so an id is never turned into a number.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from bin_counter import BinCounterError

PUBLIC_BUCKET = "aft-vbi-pds"
IMAGE_PREFIX = "bin-images/"
METADATA_PREFIX = "metadata/"
# A real bin photo is ~0.1 MP; anything past this is a decompression bomb or not a bin photo.
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL then refuses decompression bombs instead of only warning


def image_key(image_id: str) -> str:
    return f"{IMAGE_PREFIX}{image_id}.jpg"


def metadata_key(image_id: str) -> str:
    return f"{METADATA_PREFIX}{image_id}.json"


def id_from_key(key: str) -> str:
    """`metadata/01002.json` -> `01002` (the stem, exactly as written)."""
    return PurePosixPath(key).stem


def parse_count(raw: bytes | str) -> int:
    """Return EXPECTED_QUANTITY from a metadata document, or raise ValueError saying what is wrong."""
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"metadata is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(meta, dict) or "EXPECTED_QUANTITY" not in meta:
        raise ValueError("metadata has no EXPECTED_QUANTITY")
    count = meta["EXPECTED_QUANTITY"]
    # bool is an int in Python; a JSON `true` is not a count.
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"EXPECTED_QUANTITY is not an integer: {count!r}")
    if count < 0:
        raise ValueError(f"EXPECTED_QUANTITY is negative: {count}")
    return count


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int


def read_image(source: str | Path | bytes) -> Image.Image:
    """The whole image decoded to RGB, from a path or encoded bytes, or ValueError with a one-line reason.

    The size is checked before decoding (a decompression bomb never gets decoded), and the decode is complete:
    a truncated JPEG only fails there, not on its header."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {image.width}x{image.height}, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
            return image.convert("RGB")
    except ValueError:
        raise
    except FileNotFoundError:
        raise ValueError(f"no such file: {source}") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ValueError(f"image does not decode ({type(exc).__name__}: {exc})") from None


def check_image(data: bytes) -> ImageInfo:
    image = read_image(data)
    return ImageInfo(image.width, image.height)


def read_file_list(path: Path) -> list[str]:
    """Ids from the study's file_list.json ({"1": ["metadata/100313.json", ...]}) or a plain list of ids."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BinCounterError(f"file list not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise BinCounterError(f"file list {path} is not valid JSON: {exc}") from None
    if isinstance(doc, dict):
        entries = [entry for group in doc.values() if isinstance(group, list) for entry in group]
        if len(entries) == 0 or not all(isinstance(group, list) for group in doc.values()):
            raise BinCounterError(
                f"file list {path} must map counts to lists of metadata paths, e.g. "
                '{"1": ["metadata/100313.json"]}'
            )
    elif isinstance(doc, list):
        entries = doc
    else:
        raise BinCounterError(f"file list {path} must be a JSON object or a list of ids")
    if not all(isinstance(entry, str) and entry.strip() for entry in entries):
        raise BinCounterError(f"file list {path} holds entries that are not strings (ids must be strings)")
    ids = [id_from_key(entry.strip()) for entry in entries]
    return list(dict.fromkeys(ids))  # drop duplicates, keep order


def parse_classes(spec: str) -> list[int]:
    """`1-5` -> [1, 2, 3, 4, 5]; `0,2,4` -> [0, 2, 4]."""
    try:
        if "-" in spec:
            low, high = (int(part) for part in spec.split("-", 1))
            classes = list(range(low, high + 1))
        else:
            classes = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise BinCounterError(f"--classes must look like 1-5 or 0,1,2 (got {spec!r})") from None
    if len(classes) < 2 or classes[0] < 0:
        raise BinCounterError(f"--classes needs at least two non-negative counts (got {spec!r})")
    return classes
