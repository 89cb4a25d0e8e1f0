"""Facts about the Amazon Bin Image Dataset: ids, keys, metadata and the study's file_list.json.

ABID ids are strings: `1002` and `01002` are two different bins, so an id is never turned into a number.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps

from bin_counter import BinCounterError

PUBLIC_BUCKET = "aft-vbi-pds"
IMAGE_PREFIX = "bin-images/"
METADATA_PREFIX = "metadata/"
# A real bin photo is ~0.1 MP (all under 1 MP); past a phone photo's 12 MP it is a decompression bomb or not a bin
# photo: a 6.5 kB 1-bit PNG of 40 MP decodes to 120 MB of RGB. BIN_COUNTER_MAX_IMAGE_PIXELS raises it.
DEFAULT_MAX_IMAGE_PIXELS = 12_000_000
PIXELS_VARIABLE = "BIN_COUNTER_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    try:
        value = int(os.environ.get(PIXELS_VARIABLE, DEFAULT_MAX_IMAGE_PIXELS))
    except ValueError:
        return DEFAULT_MAX_IMAGE_PIXELS
    return value if value > 0 else DEFAULT_MAX_IMAGE_PIXELS
# Bin photos are JPEG (PNG for crops and tests). Every other PIL plugin is attack surface we do not need (EPS even
# runs Ghostscript), so no other plugin is allowed to parse a file. PIL's JPEG plugin names a JPEG with a second
# frame MPO: still a JPEG.
OPENERS = ("JPEG", "PNG")
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG")
# Magic numbers of the formats people send instead, so the refusal can name what was sent.
OTHER_FORMATS = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF8": "GIF", b"BM": "BMP", b"\x00\x00\x01\x00": "ICO",
                 b"%!PS": "EPS", b"\xc5\xd0\xd3\xc6": "EPS", b"\x00\x00\x00\x0cjP": "JPEG 2000",
                 b"\xffO\xffQ": "JPEG 2000", b"8BPS": "PSD"}
# The largest bin in ABID holds a few hundred items; a count past this is a corrupt or hostile document.
MAX_COUNT = 10_000


def image_key(image_id: str) -> str:
    return f"{IMAGE_PREFIX}{image_id}.jpg"


def metadata_key(image_id: str) -> str:
    return f"{METADATA_PREFIX}{image_id}.json"


def id_from_key(key: str) -> str:
    """`metadata/01002.json` -> `01002` (the stem, exactly as written)."""
    return PurePosixPath(key).stem


class DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's default keeps the last of two equal keys; which count a document meant is then a guess."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def strict_json(raw: bytes | str):
    """json.loads that refuses duplicate keys; raises ValueError (JSONDecodeError, UnicodeDecodeError,
    DuplicateKeyError, too-long integers) or RecursionError (nesting too deep)."""
    return json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)


def parse_count(raw: bytes | str) -> int:
    """Return EXPECTED_QUANTITY from a metadata document, or raise ValueError saying what is wrong."""
    try:
        meta = strict_json(raw)
    except DuplicateKeyError as exc:
        raise ValueError(f"metadata has a {exc}") from None
    except RecursionError:
        raise ValueError("metadata is nested too deeply to be ABID metadata") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise ValueError(f"metadata is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(meta, dict) or "EXPECTED_QUANTITY" not in meta:
        raise ValueError("metadata has no EXPECTED_QUANTITY")
    count = meta["EXPECTED_QUANTITY"]
    # bool is an int in Python; a JSON `true` is not a count.
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"EXPECTED_QUANTITY is not an integer: {count!r}")
    if count < 0:
        raise ValueError(f"EXPECTED_QUANTITY is negative: {count}")
    if count > MAX_COUNT:
        shown = count if count < 10**12 else f"a {len(str(count))}-digit number"
        raise ValueError(f"EXPECTED_QUANTITY is implausible (over {MAX_COUNT:,}): {shown}")
    return count


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int


def read_image(source: str | Path | bytes) -> Image.Image:
    """The whole image decoded to RGB, from a path or encoded bytes, or ValueError with a one-line reason.

    Only JPEG and PNG are parsed at all (see OPENERS). The size is checked before decoding (a
    decompression bomb never gets decoded), and the decode is complete: a truncated JPEG only fails there, not on
    its header. EXIF orientation is applied here, once, so a photo taken sideways is counted upright everywhere."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=OPENERS) as image:
            if image.format not in ACCEPTED_FORMATS:
                raise ValueError(f"image format {image.format} is not accepted (only JPEG and PNG)")
            if image.width * image.height > max_image_pixels():
                raise ValueError(f"image is {image.width}x{image.height}, over the {max_image_pixels():,}-pixel "
                                 f"limit ({PIXELS_VARIABLE})")
            return ImageOps.exif_transpose(image).convert("RGB")
    except ValueError:
        raise
    except Image.UnidentifiedImageError as exc:
        other = sniff_other_format(source)
        if other:
            raise ValueError(f"image format {other} is not accepted (only JPEG and PNG)") from None
        raise ValueError(f"image does not decode ({type(exc).__name__}: {exc})") from None
    except FileNotFoundError:
        raise ValueError(f"no such file: {source}") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ValueError(f"image does not decode ({type(exc).__name__}: {exc})") from None


def sniff_other_format(source: str | Path | bytes) -> str | None:
    """The name of a known non-accepted format from the file's first bytes, for the refusal message."""
    try:
        if isinstance(source, bytes):
            head = source[:16]
        else:
            with open(source, "rb") as handle:
                head = handle.read(16)
    except OSError:
        return None
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return next((name for magic, name in OTHER_FORMATS.items() if head.startswith(magic)), None)


def check_image(data: bytes) -> ImageInfo:
    image = read_image(data)
    return ImageInfo(image.width, image.height)


def read_file_list_entries(path: Path) -> list[str]:
    """Every entry of the study's file_list.json ({"1": ["metadata/100313.json", ...]}) or of a plain JSON list,
    stripped, in order, duplicates included; BinCounterError in one line for a file that is not such a list."""
    try:
        doc = strict_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise BinCounterError(f"file list not found: {path}") from None
    except IsADirectoryError:
        raise BinCounterError(f"file list {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise BinCounterError(f"file list {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise BinCounterError(f"file list {path} is not valid JSON: {exc}") from None
    except DuplicateKeyError as exc:
        raise BinCounterError(f"file list {path} has a {exc}: one of its lists would be lost") from None
    except (ValueError, RecursionError) as exc:
        raise BinCounterError(f"file list {path} is not a usable JSON list ({type(exc).__name__})") from None
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
    return [entry.strip() for entry in entries]


def read_file_list(path: Path) -> list[str]:
    """Ids from a file list (see read_file_list_entries), duplicates dropped, order kept."""
    return list(dict.fromkeys(id_from_key(entry) for entry in read_file_list_entries(path)))


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
