"""The training loop, readable top to bottom: loaders, epochs, the solved head, checkpoints and calibration.

No MLflow and no printing here (tests/test_layers.py checks): the loop reports through a `Recorder`, whose hooks
the `train` command fills with its MLflow run and the lines SageMaker reads its metrics from.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from bin_counter import BinCounterError
from bin_counter.core import checkpoint, distributed, heads, metrics
from bin_counter.core.calibration import CountCalibration
from bin_counter.core.choices import HEADS
from bin_counter.core.data import ManifestImages, dihedral_views, eval_transform, make_loader, train_transform
from bin_counter.core.debugger import Rules
from bin_counter.core.engine import mean_over_views
from bin_counter.core.features import FeatureViews, cached_features
from bin_counter.core.losses import make_criterion
from bin_counter.core.models import CountingModel, backbone_is_frozen
from bin_counter.core.profiling import NO_PROFILE, Profile

if TYPE_CHECKING:  # the settings' type only: the core does not import the config at run time
    from bin_counter.config import TrainConfig

log = logging.getLogger(__name__)


class Recorder:
    """What fit() and solve_head() tell as they go, as hooks that do nothing: the `train` command records them in
    its MLflow run and prints the study's lines; tune's folds record nothing."""

    def epoch(self, epoch: int, row: dict, findings: list) -> None:
        """Every epoch, the one that stopped training included (a NaN loss): its history row and the debugger's
        findings. Must not raise: it is not a way to stop training (a `pruner` is)."""

    def head_solved(self, fitted: heads.LogisticFit, images: int, seconds: float) -> None:
        """The solved head's chosen strength, before its one epoch is recorded."""


NO_RECORD = Recorder()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_train_mode(net: nn.Module) -> None:
    """Train mode, except frozen BatchNorm layers: their running statistics must stay ImageNet's."""
    net.train()
    for module in net.modules():
        frozen = not any(p.requires_grad for p in module.parameters())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
            module.eval()


def grad_norm(net: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in net.parameters() if p.grad is not None]
    return float(torch.norm(torch.stack(norms))) if norms else 0.0


def uneven_inputs(net):
    """Under DDP, ranks may get different numbers of batches (shards of unequal length, a batch with no readable
    image skipped on one rank): Join lets a rank that ran out shadow the others' gradient reductions instead of
    leaving them waiting for ever."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms import Join

        return Join([net])
    return nullcontext()


def train_one_epoch(net, criterion, optimizer, loader, device, scaler, desc="train", profiler=NO_PROFILE) -> dict:
    set_train_mode(net)
    norms: list[float] = []
    start = time.perf_counter()
    with uneven_inputs(net):
        total_loss, correct, seen = _train_batches(net, criterion, optimizer, loader, device, scaler, desc, profiler,
                                                   norms)
    seconds = time.perf_counter() - start
    total_loss, correct, seen = distributed.sum_across(total_loss, correct, seen)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "grad_norm": float(np.mean(norms or [0])), "grad_norm_max": float(np.max(norms or [0])),
            "seconds": seconds, "images_per_s": seen / seconds if seconds else 0.0}


def _train_batches(net, criterion, optimizer, loader, device, scaler, desc, profiler, norms) -> tuple:
    total_loss, correct, seen = 0.0, 0, 0
    waited = time.perf_counter()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        profiler.data_wait(time.perf_counter() - waited)
        if batch is None:
            continue
        inputs, labels, _ = batch
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with profiler.phase("forward"), torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = net(inputs)
            loss = criterion(logits, labels)
        with profiler.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        with profiler.phase("optimizer"):
            scaler.unscale_(optimizer)
            norms.append(grad_norm(net))  # the debugger rules read these
            scaler.step(optimizer)
            scaler.update()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        profiler.step(len(labels))
        waited = time.perf_counter()
    return total_loss, correct, seen


@torch.no_grad()
def evaluate_epoch(net, criterion, loader, device, tta: bool = False) -> dict:
    """Loss, class probabilities and the true class indices (and the dataset rows they belong to).

    Test-time augmentation averages the probabilities over the flips/transposes of each image (or over the
    cached features of those views, which arrive as (B, V, D))."""
    net.eval()
    total_loss, seen, y_true, rows, probs = 0.0, 0, [], [], []
    for batch in loader:
        if batch is None:
            continue
        inputs, labels, indices = batch
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if tta and inputs.dim() == 4:  # images: make the views here
            inputs = torch.stack(dihedral_views(inputs), 1)
        views = inputs if inputs.dim() in (3, 5) else inputs[:, None]  # (B, V, ...): the views of each sample
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            p = mean_over_views(net, views)
        # log-probabilities as logits: softmax(log p) = p, so the training criterion applies unchanged
        total_loss += criterion(torch.log(p.clamp_min(1e-12)), labels).item() * len(labels)
        seen += len(labels)
        y_true.append(labels.cpu())
        probs.append(p.cpu())
        rows.append(indices)
    if not seen:
        raise BinCounterError("no readable image to evaluate on")
    return {"loss": total_loss / seen, "y_true": torch.cat(y_true).numpy(), "rows": torch.cat(rows).numpy(),
            "probs": torch.cat(probs).numpy()}


def split_metrics(result: dict, classes: list[int], decoding: dict) -> dict:
    """Metrics in counts: predictions decoded from the probabilities as the served model will decode them."""
    return metrics.classification_metrics(np.asarray(classes)[result["y_true"]],
                                          metrics.decode(result["probs"], classes, **decoding), classes)


def make_optimizer(cfg: TrainConfig, model: CountingModel, net: nn.Module) -> torch.optim.Optimizer:
    """The new head learns at `lr`; unfrozen backbone stages at their own, smaller `backbone_lr`."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": cfg.lr}]
    if net is model:
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": cfg.backbone_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


@dataclass
class Loaders:
    net: nn.Module  # what the loaders feed: the head (cached features) or the whole model (images)
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    train_counts: list[int] = field(default_factory=list)  # the training labels (class balancing)


def build_loaders(cfg: TrainConfig, model: CountingModel, frames: dict[str, pd.DataFrame], classes: list[int],
                  device: torch.device) -> Loaders:
    """Loaders of a prepared DATA_DIR's images, or of their frozen features (a solved head, or a frozen backbone
    with the feature cache). A shard stream's are the command's (cloud.shards)."""
    eval_tf = eval_transform(cfg.backbone, cfg.image_size)
    train_tf = train_transform(cfg.backbone, cfg.image_size, cfg.rotation_degrees, cfg.hflip)
    if cfg.solved_head or (cfg.feature_cache and backbone_is_frozen(model)):
        loaders = {}
        for split, frame in frames.items():
            # the SGD head trains on random augmented views; the logistic head is fitted on the test-time views
            augmented = split == "train" and not cfg.solved_head
            features, ok = split_features(cfg, model, frame, classes, device, augmented, split)
            labels = torch.tensor([classes.index(int(c)) for c in frame["count"]])
            dataset = FeatureViews(features, labels, ok, random_view=augmented, all_views=not augmented)
            loaders[split] = make_loader(dataset, cfg.batch_size, shuffle=augmented, num_workers=0, seed=cfg.seed,
                                         drop_last=augmented, collate_fn=None)
        return Loaders(model.head, loaders["train"], loaders["val"], loaders.get("test"),
                       list(frames["train"]["count"]))
    loaders = {
        split: make_loader(ManifestImages(frame, classes, train_tf if split == "train" else eval_tf), cfg.batch_size,
                           shuffle=split == "train", num_workers=cfg.num_workers, seed=cfg.seed,
                           drop_last=split == "train")
        for split, frame in frames.items()
    }
    return Loaders(model, loaders["train"], loaders["val"], loaders.get("test"), list(frames["train"]["count"]))


def split_features(cfg: TrainConfig, model: CountingModel, frame: pd.DataFrame, classes: list[int],
                   device: torch.device, augmented: bool, desc: str,
                   profiler=NO_PROFILE) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of `frame` through the cache: the random training views of the SGD head
    (`augmented`), or the evaluation views (the 4 flips/transposes with --tta). Tune's folds read the same cache."""
    transform = train_transform(cfg.backbone, cfg.image_size, cfg.rotation_degrees, cfg.hflip) if augmented \
        else eval_transform(cfg.backbone, cfg.image_size)
    augmentation = {"rotation": cfg.rotation_degrees, "hflip": cfg.hflip, "train": True} if augmented else {}
    description = {"backbone": cfg.backbone, "weights": weights_id(cfg.weights), "size": cfg.image_size,
                   **augmentation}
    return cached_features(
        model, frame, classes, transform, views=cfg.feature_views if augmented else 1, description=description,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir and cfg.feature_cache else None, batch_size=cfg.batch_size,
        num_workers=cfg.num_workers, seed=cfg.seed, device=device, desc=desc, tta=cfg.tta and not augmented,
        profiler=profiler)


def weights_id(weights: str | None) -> str:
    if not weights:
        return "default"
    path = Path(weights)
    return f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.exists() else weights


def epoch_row(epoch: int, train_stats: dict, val: dict, val_metrics: dict) -> dict:
    return {"epoch": epoch, "train_loss": train_stats["loss"], "train_accuracy": train_stats["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val_metrics["accuracy"],
            "val_precision": val_metrics["precision_macro"], "val_recall": val_metrics["recall_macro"],
            "val_f1": val_metrics["f1_macro"], "val_mae": val_metrics["mae"], "grad_norm": train_stats["grad_norm"],
            "grad_norm_max": train_stats["grad_norm_max"], "epoch_seconds": train_stats["seconds"],
            "images_per_s": train_stats["images_per_s"]}


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_val: dict
    findings: list = field(default_factory=list)
    stopped: str | None = None  # why training stopped early (NaN loss), if it did
    held_out: tuple[np.ndarray, np.ndarray] | None = None  # a solved head's out-of-fold (probabilities, labels)


@dataclass
class Checkpointing:
    """Where fit() saves its state at every epoch end, and the state it resumes from (if any)."""

    path: Path
    run_id: str
    resume_from: dict | None = None
    # saved with every checkpoint, for a resume to compare: the run's settings and its data's digest (a resume must
    # see the same data, not only the same options)
    settings: dict = field(default_factory=dict)


@dataclass
class Progress:
    """What fit() carries from epoch to epoch, and what a checkpoint saves and restores of it."""

    best_loss: float = float("inf")
    best_state: dict | None = None  # the weights of the epoch with the lowest validation loss
    best_epoch: int = 0
    best_val: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # one per finished epoch

    def keep_if_best(self, row: dict, net: nn.Module) -> None:
        if row["val_loss"] < self.best_loss:
            self.best_loss, self.best_epoch, self.best_val = row["val_loss"], row["epoch"], row
            self.best_state = copy.deepcopy(net.state_dict())


@dataclass
class Training:
    """The objects one fit() trains with, built once from the config."""

    net: nn.Module  # the module whose state is saved and evaluated
    train_net: nn.Module  # the same, wrapped in DDP under torchrun (DDP only wraps the training forward)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def make_training(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int],
                  device: torch.device) -> Training:
    net = loaders.net
    optimizer = make_optimizer(cfg, model, net)
    return Training(
        net=net,
        train_net=nn.parallel.DistributedDataParallel(net) if distributed.current().enabled else net,
        criterion=make_criterion(cfg, classes, loaders.train_counts).to(device),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs),
        scaler=torch.amp.GradScaler(device.type, enabled=device.type == "cuda"),
    )


def resume(checkpointing: Checkpointing | None, t: Training, loaders: Loaders) -> tuple[Progress, int]:
    """The progress to continue from and the first epoch still to train (1 for a fresh fit)."""
    if not (checkpointing and checkpointing.resume_from):
        return Progress(), 1
    saved = checkpoint.restore(checkpointing.resume_from, t.net, t.optimizer, t.scheduler, t.scaler,
                               [loaders.train, loaders.val])
    progress = Progress(**saved)
    last = checkpointing.resume_from["epoch"]
    log.info("resuming after epoch %d (best so far: epoch %d)", last, progress.best_epoch)
    return progress, last + 1


def save_checkpoint(checkpointing: Checkpointing, cfg: TrainConfig, epoch: int, t: Training, progress: Progress,
                    loaders: Loaders) -> None:
    checkpoint.save(checkpointing.path, epoch, t.net, t.optimizer, t.scheduler, t.scaler, vars(progress),
                    [loaders.train, loaders.val], checkpointing.run_id, checkpointing.settings)


def new_epoch_order(loaders: Loaders, epoch: int) -> None:
    """A new shuffle every epoch, alike on all ranks (DistributedSampler or a shard stream's own)."""
    for shuffler in (loaders.train.sampler, loaders.train.dataset):
        if isinstance(shuffler, DistributedSampler) or hasattr(shuffler, "set_epoch"):
            shuffler.set_epoch(epoch)


def fit(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int], device: torch.device,
        rules: Rules | None = None, profiler=NO_PROFILE, checkpointing: Checkpointing | None = None,
        recorder: Recorder = NO_RECORD, pruner=None) -> FitResult:
    """Train for cfg.epochs, keep the weights of the epoch with the lowest validation loss.

    The debugger rules look at every epoch; a NaN/inf loss stops training, keeping the best epoch so far.
    With `checkpointing`, every finished epoch is saved, and a resumed fit continues after the saved epoch.
    `recorder.epoch` is told every epoch, the one that stopped training included; `pruner(epoch, row)` follows each
    kept epoch and may raise to end training there (Optuna's pruning).
    """
    rules = rules or Rules()
    main_rank = distributed.current().main
    t = make_training(cfg, model, loaders, classes, device)
    progress, first_epoch = resume(checkpointing, t, loaders)
    stopped = None
    for epoch in range(first_epoch, cfg.epochs + 1):
        new_epoch_order(loaders, epoch)
        train_stats = train_one_epoch(t.train_net, t.criterion, t.optimizer, loaders.train, device, t.scaler,
                                      f"epoch {epoch}", profiler if epoch == 1 else NO_PROFILE)
        val = evaluate_epoch(t.net, t.criterion, loaders.val, device, cfg.tta)
        val_metrics = split_metrics(val, classes, cfg.decoding)
        t.scheduler.step()
        row = epoch_row(epoch, train_stats, val, val_metrics)
        progress.rows.append(row)
        findings = rules.check_epoch(progress.rows)
        for finding in findings:
            log.warning("debugger: %s at epoch %d: %s", finding.rule, finding.epoch, finding.message)
        recorder.epoch(epoch, row, findings)
        if any(finding.rule == "nan_loss" for finding in findings):
            stopped = f"loss became NaN/inf at epoch {epoch}"
            break
        progress.keep_if_best(row, t.net)
        if checkpointing and main_rank:
            save_checkpoint(checkpointing, cfg, epoch, t, progress, loaders)
        if pruner is not None:
            pruner(epoch, row)
    if progress.best_state is not None:
        t.net.load_state_dict(progress.best_state)
    return FitResult(pd.DataFrame(progress.rows), progress.best_epoch, progress.best_val, list(rules.findings),
                     stopped)


def solve_head(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int], device: torch.device,
               rules: Rules | None = None, checkpointing: Checkpointing | None = None, recorder: Recorder = NO_RECORD,
               pruner=None) -> FitResult:
    """The logistic head, solved on the frozen features of the train and val splits (heads.fit_logistic).

    Its strength is chosen by cross-validation over those images, so the reported validation metrics are
    out-of-fold predictions: no image is scored by a head that saw it. One "epoch" of history, seconds long."""
    parts = [loaders.train.dataset, loaders.val.dataset]
    features, labels = torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts])
    start = time.perf_counter()
    fitted = heads.fit_logistic(features, labels, len(classes), balance=cfg.balance, seed=cfg.seed)
    seconds = time.perf_counter() - start
    fitted.write_into(model.head)
    in_sample = fitted.probabilities(features)
    val_metrics = split_metrics({"y_true": labels.numpy(), "probs": fitted.oof_probs}, classes, cfg.decoding)
    row = {"epoch": 1, "train_loss": heads.log_loss(in_sample, labels.numpy()),
           "train_accuracy": float((in_sample.argmax(1) == labels.numpy()).mean()),
           "val_loss": heads.log_loss(fitted.oof_probs, labels.numpy()), "val_accuracy": val_metrics["accuracy"],
           "val_precision": val_metrics["precision_macro"], "val_recall": val_metrics["recall_macro"],
           "val_f1": val_metrics["f1_macro"], "val_mae": val_metrics["mae"], "head_c": fitted.c,
           "epoch_seconds": seconds, "images_per_s": len(labels) / seconds if seconds else 0.0}
    recorder.head_solved(fitted, len(labels), seconds)
    recorder.epoch(1, row, [])
    if pruner is not None:
        pruner(1, row)
    return FitResult(pd.DataFrame([row]), 1, row, held_out=(fitted.oof_probs, labels.numpy()))


def held_out_probabilities(loaders: Loaders, result: FitResult, criterion, device, tta: bool):
    """(probabilities, class indices) no head saw when fitting: out of fold for the solved head, else the
    validation split. The calibration is fitted on these."""
    if result.held_out is not None:
        return result.held_out
    val = evaluate_epoch(loaders.net, criterion, loaders.val, device, tta)
    return val["probs"], val["y_true"]


def fit_calibration(cfg: TrainConfig, loaders: Loaders, result: FitResult, classes: list[int],
                    device: torch.device) -> CountCalibration:
    criterion = make_criterion(cfg, classes, loaders.train_counts).to(device)
    probs, labels = held_out_probabilities(loaders, result, criterion, device, cfg.tta)
    fitted = CountCalibration.fit(probs, labels, cfg.coverage, cfg.false_alarm)
    log.info("calibration: temperature %.3f fitted on %d held-out images", fitted.temperature, len(labels))
    return fitted


def profiled_fit(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int], device: torch.device,
                 folder: Path, frame: pd.DataFrame, **hooks) -> tuple[FitResult, Profile]:
    """fit() with the profiler over the first epoch, its traces in `folder` (`frame` is not read: the SGD head's
    training images are its loaders')."""
    with Profile(device, cfg.batch_size, folder) as profile:
        result = fit(cfg, model, loaders, classes, device, profiler=profile, **hooks)
    return result, profile


def profiled_solve(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int], device: torch.device,
                   folder: Path, frame: pd.DataFrame, **hooks) -> tuple[FitResult, Profile]:
    """The solved head's real cost: a fresh frozen-feature pass over the training images `frame` (the cache
    bypassed, so there is something to measure) under the profiler, then the solve."""
    with Profile(device, cfg.batch_size, folder, stage="feature pass") as profile:
        split_features(replace(cfg, feature_cache=False), model, frame, classes, device, augmented=False,
                       desc="profiled train", profiler=profile)
        result = solve_head(cfg, model, loaders, classes, device, **hooks)
    profile.solve_seconds = result.best_val["epoch_seconds"]
    return result, profile


def head_fitter(head: str, profiled: bool = False):
    """The function that fits `head` (core.choices.HEADS), or its variant under the profiler."""
    spec = HEADS[head]
    return globals()[spec.profiled_fit if profiled else spec.fit]
