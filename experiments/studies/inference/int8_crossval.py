"""Does int8 cost accuracy? The 5-fold x 2 protocol of crossval on the dev sample, default recipe (lite0, 320 px,
4 test-time views, balanced logistic head, ordinal decoding): the head is fitted on fp32 features of the
training folds (as `train` does) and scored on the held-out fold's features from the fp32 and the int8 backbone.

    python experiments/studies/inference/int8_crossval.py [../shared/abid-sample]
needs .cache/explore/efficientnet-lite0-320.npz from experiments/studies/head_study/features.py
(same images, same order).
"""
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import RepeatedStratifiedKFold

from bin_counter.config import TrainConfig
from bin_counter.core.data import ManifestImages, dihedral_views, eval_transform
from bin_counter.core.engine import FeaturesOnly, OnnxEngine, export_onnx, quantize_int8
from bin_counter.core.heads import fit_logistic
from bin_counter.core.manifest import read_manifest
from bin_counter.core.metrics import decode
from bin_counter.core.models import create_model

CLASSES = [1, 2, 3, 4, 5]
cfg = TrainConfig()
fp32 = np.load(".cache/explore/efficientnet-lite0-320.npz", allow_pickle=True)
manifest = read_manifest(Path(".cache/explore/all"))
assert list(manifest["image_id"]) == list(fp32["ids"]), "features and manifest differ in order"
x32 = torch.tensor(fp32["X"].astype(np.float32))
y = torch.tensor(fp32["y"] - 1)
splits = list(RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=1).split(x32[:, 0], y))

model = create_model(cfg.backbone, 5).eval()
images = ManifestImages(manifest, CLASSES, eval_transform(cfg.backbone, cfg.image_size))
start = time.time()
calibration_rows = np.random.default_rng(0).choice(splits[0][0], 64, replace=False)  # fold 0's training images
calibration = [torch.stack([images[int(i)][0] for i in calibration_rows[k:k + 16]]) for k in range(0, 64, 16)]
int8 = OnnxEngine(quantize_int8(export_onnx(FeaturesOnly(model), cfg.image_size), calibration))
print(f"quantised in {time.time() - start:.0f} s")
start = time.time()
x8 = torch.zeros_like(x32)
for k in range(0, len(manifest), 32):
    rows = list(range(k, min(k + 32, len(manifest))))
    batch = torch.stack([images[i][0] for i in rows])
    x8[rows] = torch.stack(int8(torch.cat(dihedral_views(batch))).chunk(4), 1)
print(f"int8 features of {len(manifest)} images x 4 views in {time.time() - start:.0f} s; relative error "
      f"{float((x8 - x32).abs().mean() / x32.abs().mean()):.3f}")

rows = []
for k, (train_idx, test_idx) in enumerate(splits):
    head = fit_logistic(x32[train_idx], y[train_idx], 5, balance=cfg.balance)
    truth = y[test_idx].numpy() + 1
    counts = {name: decode(head.probabilities(x[test_idx]), CLASSES, **cfg.decoding) for name, x in
              (("fp32", x32), ("int8", x8))}
    rows.append([(counts[n] == truth).mean() for n in ("fp32", "int8")]
                + [np.abs(counts[n] - truth).mean() for n in ("fp32", "int8")]
                + [(counts["fp32"] == counts["int8"]).mean()])
    print(f"fold {k}: accuracy fp32 {rows[-1][0]:.3f} int8 {rows[-1][1]:.3f}", flush=True)
r = np.array(rows)
gap = 100 * (r[:, 1] - r[:, 0])
print(f"accuracy fp32 {r[:, 0].mean():.3f} ± {r[:, 0].std():.3f}, int8 {r[:, 1].mean():.3f} ± {r[:, 1].std():.3f}, "
      f"difference {gap.mean():+.1f} points (paired folds: {gap.std():.1f}); "
      f"MAE fp32 {r[:, 2].mean():.3f} int8 {r[:, 3].mean():.3f}; same count {r[:, 4].mean():.3f}")
