"""Step 4: why the SGD-trained study head loses to the probe: the same 224 px test-time-view features, one
change at a time (5 folds x 2 repeats, argmax). python experiments/studies/head_study/sgd_diagnosis.py"""

import copy

import numpy as np
import torch
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split
from torch import nn

torch.set_num_threads(1)
d = np.load(".cache/explore/efficientnet-lite0-224.npz")
X = torch.tensor(d["X"].astype(np.float32))
y = torch.tensor(d["y"] - 1)


def head(bn=True, p=0.5):
    return nn.Sequential(nn.BatchNorm1d(1280) if bn else nn.Identity(), nn.Dropout(p), nn.Linear(1280, 5))


def run(tr, te, epochs=10, bn=True, wd=1e-4, lr=1e-3, select="val", bs=32, p=0.5, seed=0):
    torch.manual_seed(seed)
    trn, val = train_test_split(tr, test_size=0.1, random_state=seed, stratify=y[tr])
    net = head(bn, p)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    best, state = 1e9, None
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(trn))
        for i in range(0, len(trn) - bs + 1, bs):
            idx = trn[perm[i : i + bs]]
            v = torch.randint(4, (len(idx),))
            loss = nn.functional.cross_entropy(net(X[idx, v]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sch.step()
        net.eval()
        with torch.no_grad():
            pv = torch.softmax(net(X[val].flatten(0, 1)), 1).view(len(val), 4, 5).mean(1)
            vl = nn.functional.nll_loss(pv.log(), y[val]).item()
        if select == "last" or vl < best:
            best, state = vl, copy.deepcopy(net.state_dict())
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        pt = torch.softmax(net(X[te].flatten(0, 1)), 1).view(len(te), 4, 5).mean(1)
    return (pt.argmax(1) == y[te]).float().mean().item()


variants = {
    "study head (10 ep, BN, wd 1e-4, best val)": {},
    "last epoch": {"select": "last"},
    "no BatchNorm": {"bn": False},
    "40 epochs": {"epochs": 40},
    "weight decay 1e-1": {"wd": 0.1},
    "40 ep + wd 1e-1 + no BN": {"epochs": 40, "wd": 0.1, "bn": False},
    "batch 256": {"bs": 256},
    "no dropout": {"p": 0.0},
    "lr 1e-2": {"lr": 1e-2},
}
folds = list(RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=0).split(X[:, 0], y))
for name, kw in variants.items():
    a = np.array([run(torch.tensor(tr), torch.tensor(te), **kw) for tr, te in folds])
    print(f"| {name} | {a.mean():.3f} ± {a.std(ddof=1) * 2.262 / np.sqrt(len(a)):.3f} |", flush=True)
