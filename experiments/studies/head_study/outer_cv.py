"""Step 2: out-of-fold probabilities of the logistic head (heads.fit_logistic, C chosen by inner CV) over the
same 5 folds x 2 repeats as crossval, for one feature set or a concatenation of several.

    python experiments/studies/head_study/outer_cv.py efficientnet-lite0-320 [balance]"""
import sys
import time

import numpy as np
import torch
from sklearn.model_selection import RepeatedStratifiedKFold

from bin_counter.core.heads import fit_logistic

names = sys.argv[1].split(",")
balance = len(sys.argv) > 2 and sys.argv[2] == "balance"
sets = [np.load(f".cache/explore/{name}.npz") for name in names]
x = torch.tensor(np.concatenate([s["X"].astype(np.float32) for s in sets], axis=2))
y = torch.tensor(sets[0]["y"] - 1)
probs = np.zeros((2, len(y), 5))
start = time.time()
splits = RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=0).split(x[:, 0], y)
for k, (train_idx, test_idx) in enumerate(splits):
    fitted = fit_logistic(x[train_idx], y[train_idx], 5, balance=balance)
    probs[k // 5, test_idx] = fitted.probabilities(x[test_idx])
    print(f"fold {k}: C={fitted.c:g}", flush=True)
np.savez(f".cache/explore/oof-{sys.argv[1]}{'-bal' if balance else ''}.npz", P=probs, y=y.numpy())
print(f"{time.time() - start:.0f} s")
