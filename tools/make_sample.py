"""Rebuild the sample bundled in the package (bin_counter/sample/) from a directory in ABID's layout.

    python tools/make_sample.py ../shared/abid-sample --per-class 100 --short-side 224

The images are real ABID photographs, resized so the repository stays small (their shorter side becomes
224 px, the study's input size); their metadata is copied unchanged. The licence notice travels with them.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

from PIL import Image

NOTICE = """# Bundled ABID sample

{n} real images from the Amazon Bin Image Dataset (ABID), {per_class} per count 1-5, in ABID's own layout
(`bin-images/<id>.jpg`, `metadata/<id>.json`). The photographs were resized (shorter side {short_side} px,
JPEG quality {quality}) so that the repository stays small; ids and counts are unchanged. Rebuild with
`python tools/make_sample.py`.

Licence: the Amazon Bin Image Dataset is published on the Registry of Open Data on AWS (bucket `aft-vbi-pds`)
under Creative Commons Attribution-NonCommercial-ShareAlike 3.0 United States (CC BY-NC-SA 3.0 US).
Credit: "Amazon Bin Image Dataset, Amazon.com". This resized copy is shared under the same licence.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bin_counter" / "sample")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--short-side", type=int, default=224)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    by_count: dict[int, list[str]] = defaultdict(list)
    for meta in sorted((args.source / "metadata").glob("*.json")):
        by_count[json.loads(meta.read_text())["EXPECTED_QUANTITY"]].append(meta.stem)
    rng = random.Random(args.seed)
    chosen = {count: sorted(rng.sample(ids, min(args.per_class, len(ids)))) for count, ids in sorted(by_count.items())}

    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "bin-images").mkdir(parents=True)
    (args.out / "metadata").mkdir()
    file_list = {}
    for count, ids in chosen.items():
        file_list[str(count)] = [f"metadata/{image_id}.json" for image_id in ids]
        for image_id in ids:
            with Image.open(args.source / "bin-images" / f"{image_id}.jpg") as image:
                image = image.convert("RGB")
                scale = args.short_side / min(image.size)
                if scale < 1:
                    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
                image.save(args.out / "bin-images" / f"{image_id}.jpg", quality=args.quality)
            shutil.copyfile(args.source / "metadata" / f"{image_id}.json", args.out / "metadata" / f"{image_id}.json")
    (args.out / "file_list.json").write_text(json.dumps(file_list, indent=1) + "\n")
    n = sum(len(ids) for ids in chosen.values())
    (args.out / "README.md").write_text(
        NOTICE.format(n=n, per_class=args.per_class, short_side=args.short_side, quality=args.quality)
    )
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    main()
