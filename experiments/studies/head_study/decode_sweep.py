"""Step 3: every decoding of the out-of-fold probabilities, scored per fold (accuracy +- 95% interval, MAE,
macro F1, the lowest recall of any count).

    python experiments/studies/head_study/decode_sweep.py efficientnet-lite0-320-bal"""
import sys

import numpy as np
from sklearn.metrics import f1_score, recall_score
from sklearn.model_selection import RepeatedStratifiedKFold

from bin_counter.core.metrics import decode

data = np.load(f".cache/explore/oof-{sys.argv[1]}.npz")
probs, y = data["P"], data["y"] + 1
classes = [1, 2, 3, 4, 5]


def report(name, **decoding):
    rows = []
    splits = RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=0).split(probs[0], y)
    for k, (_, test_idx) in enumerate(splits):
        pred, truth = decode(probs[k // 5, test_idx], classes, **decoding), y[test_idx]
        rows.append((np.mean(pred == truth), np.abs(pred - truth).mean(), f1_score(truth, pred, average="macro"),
                     recall_score(truth, pred, average=None, labels=classes).min()))
    a = np.array(rows)
    half = a[:, 0].std(ddof=1) * 2.262 / np.sqrt(len(a))
    print(f"| {name} | {a[:, 0].mean():.3f} ± {half:.3f} | {a[:, 1].mean():.3f} | {a[:, 2].mean():.3f} | "
          f"{a[:, 3].mean():.3f} |")


print("| decoding | accuracy | MAE | macro F1 | lowest recall |\n|---|---|---|---|---|")
report("argmax", how="argmax")
report("expected", how="expected")
for cost in (0.5, 1.0, 2.0, 4.0):
    for boost in (0.0, 0.25, 0.5, 0.75):
        report(f"ordinal cost {cost} tail boost {boost}", how="ordinal", cost=cost, tail_boost=boost)
