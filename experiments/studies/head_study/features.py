"""Step 1 of the head study: frozen features of the dev sample's 4 test-time views, saved for the other steps.

    python experiments/studies/head_study/features.py efficientnet-lite0 224 [../shared/abid-sample]
writes .cache/explore/<backbone>-<size>.npz (X: images x 4 views x D, y: counts, ids)."""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bin_counter.commands.prepare import build_data_dir
from bin_counter.config import PrepareConfig
from bin_counter.core.data import eval_transform
from bin_counter.core.features import cached_features
from bin_counter.core.manifest import read_manifest
from bin_counter.core.models import create_model

backbone, size = sys.argv[1], int(sys.argv[2])
source = sys.argv[3] if len(sys.argv) > 3 else str(Path(__file__).resolve().parents[4] / "shared" / "abid-sample")
out = Path(".cache/explore")
build_data_dir(PrepareConfig(source=source, out=str(out / "all"), split=(1.0, 0, 0)))
manifest = read_manifest(out / "all")
model = create_model(backbone, 5).eval()
start = time.time()
features, ok = cached_features(model, manifest, [1, 2, 3, 4, 5], eval_transform(backbone, size), views=1,
                               description={"backbone": backbone, "weights": "default", "size": size},
                               cache_dir=Path(".cache/features"), batch_size=32, num_workers=2, seed=0,
                               device=torch.device("cpu"), desc="all", tta=True)
print(f"{backbone} @ {size}: {time.time() - start:.0f} s, {tuple(features.shape)}, all readable: {bool(ok.all())}")
np.savez(out / f"{backbone}-{size}.npz", X=features.numpy(), y=manifest["count"].to_numpy(),
         ids=manifest["image_id"].to_numpy())
