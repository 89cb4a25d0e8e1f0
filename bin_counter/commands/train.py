"""train: the loop, readable top to bottom, and the `train` command around it."""
from __future__ import annotations

import copy
import functools
import logging
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from bin_counter import BinCounterError, one_line, plots, reports, tracking
from bin_counter.cloud import s3
from bin_counter.config import TrainConfig, as_params
from bin_counter.core import checkpoint, distributed, heads, metrics
from bin_counter.core.answers import answer_frame
from bin_counter.core.calibration import CountCalibration
from bin_counter.core.data import ManifestImages, dihedral_views, eval_transform, make_loader, train_transform
from bin_counter.core.debugger import Rules
from bin_counter.core.engine import mean_over_views
from bin_counter.core.features import FeatureViews, cached_features
from bin_counter.core.manifest import check_counts, read_classes, read_manifest
from bin_counter.core.models import CountingModel, backbone_is_frozen, create_model, freeze
from bin_counter.core.profiling import NO_PROFILE, Profile, profiler_findings, write_report
from bin_counter.core.uris import redact_uri
from bin_counter.serving.packaging import log_model

log = logging.getLogger(__name__)


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


class CountingLoss(nn.Module):
    """Cross-entropy (class-weighted with `balance`), plus, with `expected_weight`, the distance between the
    expected count under the predicted distribution and the true count: counts are ordered, and being off by
    one should cost less than being off by four."""

    def __init__(self, classes: list[int], class_weights: torch.Tensor | None = None, expected_weight: float = 0.0):
        super().__init__()
        self.register_buffer("values", torch.tensor(classes, dtype=torch.float32))
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)
        self.expected_weight = expected_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, labels, weight=self.class_weights)
        if self.expected_weight:
            expected = logits.float().softmax(1) @ self.values
            loss = loss + self.expected_weight * (expected - self.values[labels]).abs().mean()
        return loss


def make_criterion(cfg: TrainConfig, classes: list[int], train_counts) -> CountingLoss:
    weights = None
    if cfg.balance:  # inverse class frequency, mean 1
        counts = torch.tensor([float((np.asarray(train_counts) == c).sum()) for c in classes]).clamp(min=1)
        weights = (1 / counts) / (1 / counts).mean()
    return CountingLoss(classes, weights, cfg.expected_weight if cfg.loss == "ce+expected" else 0.0)


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


def stream_loaders(cfg: TrainConfig, model: CountingModel, frames: dict[str, pd.DataFrame], classes: list[int],
                   eval_tf, train_tf) -> Loaders:
    """Shards read front to back (local or S3): for data larger than the disk; the full forward pass every epoch."""
    from bin_counter.cloud.shards import ShardStream, shard_urls, stream_collate

    loaders = {}
    for split in frames:
        training = split == "train"
        dataset = ShardStream(shard_urls(cfg.data, split), classes, train_tf if training else eval_tf,
                              shuffle=training, seed=cfg.seed)
        loaders[split] = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                    collate_fn=stream_collate, pin_memory=torch.cuda.is_available())
    return Loaders(model, loaders["train"], loaders["val"], loaders.get("test"), list(frames["train"]["count"]))


def build_loaders(cfg: TrainConfig, model: CountingModel, frames: dict[str, pd.DataFrame], classes: list[int],
                  device: torch.device) -> Loaders:
    eval_tf = eval_transform(cfg.backbone, cfg.image_size)
    train_tf = train_transform(cfg.backbone, cfg.image_size, cfg.rotation_degrees, cfg.hflip)
    if cfg.stream:
        return stream_loaders(cfg, model, frames, classes, eval_tf, train_tf)
    if cfg.head == "logistic" or (cfg.feature_cache and backbone_is_frozen(model)):
        loaders = {}
        for split, frame in frames.items():
            # the SGD head trains on random augmented views; the logistic head is fitted on the test-time views
            augmented = split == "train" and cfg.head == "sgd"
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


# the history's columns under the metric vocabulary (metrics.metric_key): the split first
EPOCH_METRICS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "val_loss": "val/loss",
                 "val_accuracy": "val/accuracy", "val_precision": "val/precision_macro",
                 "val_recall": "val/recall_macro", "val_f1": "val/f1_macro", "val_mae": "val/mae",
                 "grad_norm": "train/grad_norm", "grad_norm_max": "train/grad_norm_max",
                 "epoch_seconds": "train/epoch_seconds", "images_per_s": "train/images_per_s", "head_c": "train/head_c"}


def log_epoch_to_run(epoch: int, row: dict, findings: list) -> None:
    """The command's epoch callback: the epoch's metrics and the debugger's findings into the MLflow run."""
    mlflow.log_metrics({EPOCH_METRICS.get(k, f"train/{k}"): v for k, v in row.items()
                        if k != "epoch" and np.isfinite(v)}, step=epoch)
    for finding in findings:
        mlflow.set_tag(*finding.as_tag())


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
    data_digest: str = ""  # a resume must see the same data, not only the same options


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
                    [loaders.train, loaders.val], checkpointing.run_id,
                    {**as_params(cfg), "data_digest": checkpointing.data_digest})


def new_epoch_order(loaders: Loaders, epoch: int) -> None:
    """A new shuffle every epoch, alike on all ranks (DistributedSampler or a shard stream's own)."""
    for shuffler in (loaders.train.sampler, loaders.train.dataset):
        if isinstance(shuffler, DistributedSampler) or hasattr(shuffler, "set_epoch"):
            shuffler.set_epoch(epoch)


def fit(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int], device: torch.device,
        on_epoch=None, rules: Rules | None = None, profiler=NO_PROFILE, checkpointing: Checkpointing | None = None,
        log_epoch=None, verbose: bool = True) -> FitResult:
    """Train for cfg.epochs, keep the weights of the epoch with the lowest validation loss.

    The debugger rules look at every epoch; a NaN/inf loss stops training, keeping the best epoch so far.
    With `checkpointing`, every finished epoch is saved, and a resumed fit continues after the saved epoch.
    `log_epoch(epoch, row, findings)` records every epoch, the one that stopped training included (the command
    logs to its MLflow run there); `on_epoch(epoch, row)` follows each kept epoch and may raise (Optuna's pruning).
    `verbose=False` leaves out the study's printed lines (tune's folds would print thousands).
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
        if main_rank and verbose:
            print(f"Epoch {epoch}/{cfg.epochs}  Train loss: {train_stats['loss']:.4f}  "
                  f"Train accuracy: {train_stats['accuracy']:.4f}")
            print(metrics.study_lines(val["loss"], val_metrics), flush=True)
        row = epoch_row(epoch, train_stats, val, val_metrics)
        progress.rows.append(row)
        findings = rules.check_epoch(progress.rows)
        for finding in findings:
            log.warning("debugger: %s at epoch %d: %s", finding.rule, finding.epoch, finding.message)
        if log_epoch is not None:
            log_epoch(epoch, row, findings)
        if any(finding.rule == "nan_loss" for finding in findings):
            stopped = f"loss became NaN/inf at epoch {epoch}"
            break
        progress.keep_if_best(row, t.net)
        if checkpointing and main_rank:
            save_checkpoint(checkpointing, cfg, epoch, t, progress, loaders)
        if on_epoch is not None:
            on_epoch(epoch, row)
    if progress.best_state is not None:
        t.net.load_state_dict(progress.best_state)
    return FitResult(pd.DataFrame(progress.rows), progress.best_epoch, progress.best_val, list(rules.findings),
                     stopped)


def solve_head(cfg: TrainConfig, model: CountingModel, loaders: Loaders, classes: list[int], device: torch.device,
               on_epoch=None, rules: Rules | None = None, checkpointing: Checkpointing | None = None,
               log_epoch=None) -> FitResult:
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
    print(f"Logistic head: C={fitted.c:g} (cross-validated held-out log-loss per C: "
          f"{', '.join(f'{c:g}: {v:.3f}' for c, v in fitted.cv_log_loss.items()) or 'not cross-validated'}), "
          f"{len(labels)} images, {seconds:.1f} s")
    print(metrics.study_lines(row["val_loss"], val_metrics), flush=True)
    if log_epoch is not None:
        log_epoch(1, row, [])
    if on_epoch is not None:
        on_epoch(1, row)
    return FitResult(pd.DataFrame([row]), 1, row, held_out=(fitted.oof_probs, labels.numpy()))


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None
    test_metrics: dict | None
    best_epoch: int
    history: pd.DataFrame
    calibration: CountCalibration | None = None


def split_frames(data: str) -> dict[str, pd.DataFrame]:
    manifest = read_manifest(s3.local_copy(data))
    frames = {split: manifest[manifest["split"] == split].reset_index(drop=True) for split in ("train", "val", "test")}
    for split in ("train", "val"):
        if frames[split].empty:
            raise BinCounterError(f"the {split} split of {data} is empty; prepare it with a non-zero {split} ratio")
    if frames["test"].empty:
        del frames["test"]
    return frames


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


def test_split_report(cfg: TrainConfig, loaders: Loaders, frames: dict[str, pd.DataFrame], classes: list[int],
                      device: torch.device, calibration: CountCalibration) -> reports.Report | None:
    """The best epoch's model on the test split, through the same (cached) inputs as training and the same
    answers as the served model (answers.answer_frame)."""
    if loaders.test is None:
        return None
    test = evaluate_epoch(loaders.net, make_criterion(cfg, classes, loaders.train_counts).to(device), loaders.test,
                          device, cfg.tta)
    rows = frames["test"].iloc[test["rows"]] if not cfg.stream else \
        pd.DataFrame({"image_id": test["rows"].astype(str), "count": np.asarray(classes)[test["y_true"]]})
    table = rows[[c for c in ("image_id", "count", "abs_path") if c in rows]].reset_index(drop=True)
    table = pd.concat([table, answer_frame(test["probs"], classes, cfg.decoding, calibration)], axis=1)
    table["error"] = ""
    report = reports.split_report(table, classes)
    report.metrics.update(loss=test["loss"], raw_probs=test["probs"], y_true=test["y_true"],
                          probs=reports.probability_columns(table, classes))  # calibrated, as answered
    return report


def profiled_fit(cfg: TrainConfig, model, loaders: Loaders, classes, device, on_epoch, rules: Rules,
                 checkpointing: Checkpointing | None = None, log_epoch=None) -> FitResult:
    """fit() with the profiler over the first epoch; the report and its findings go to the active run."""
    with tempfile.TemporaryDirectory(prefix="bin-counter-profile-") as tmp:
        with Profile(device, cfg.batch_size, Path(tmp)) as profile:
            result = fit(cfg, model, loaders, classes, device, on_epoch, rules, profiler=profile,
                         checkpointing=checkpointing, log_epoch=log_epoch)
        log_profile(profile, result, Path(tmp))
    return result


def profiled_solve(cfg: TrainConfig, model, loaders: Loaders, classes, device, on_epoch, rules: Rules,
                   checkpointing: Checkpointing | None = None, log_epoch=None, frame: pd.DataFrame | None = None
                   ) -> FitResult:
    """The solved head's real cost: a fresh frozen-feature pass over the training images (the cache bypassed, so
    there is something to measure) under the profiler, then the solve; the report goes to the active run."""
    with tempfile.TemporaryDirectory(prefix="bin-counter-profile-") as tmp:
        with Profile(device, cfg.batch_size, Path(tmp), stage="feature pass") as profile:
            split_features(replace(cfg, feature_cache=False), model, frame, classes, device, augmented=False,
                           desc="profiled train", profiler=profile)
            result = solve_head(cfg, model, loaders, classes, device, on_epoch, rules, checkpointing, log_epoch)
        profile.solve_seconds = result.best_val["epoch_seconds"]
        log_profile(profile, result, Path(tmp))
    return result


def log_profile(profile: Profile, result: FitResult, folder: Path) -> None:
    """The report (HTML, summary, operator table, traces) from the profiler's `folder`, its figures as metrics and
    its findings as tags."""
    for path in write_report(profile, result.findings, folder).values():
        mlflow.log_artifact(str(path), "profiler")
    summary = profile.summary()
    mlflow.log_metrics({f"profile/{k}": v for k, v in summary.items() if isinstance(v, float) and np.isfinite(v)})
    for rule, message in profiler_findings(summary):
        log.warning("profiler: %s: %s", rule, message)
        mlflow.set_tag(f"profiler.{rule}", message)


def ensure_data(data: str) -> None:
    """`mlflow run . -e train` on a fresh checkout: with no data directory at all, start from the bundled sample."""
    if not data.startswith("s3://") and not Path(data).exists():
        from bin_counter.commands.prepare import prepare
        from bin_counter.config import PrepareConfig

        log.info("no data at %s: preparing the bundled ABID sample there first", data)
        prepare(PrepareConfig(source="sample", out=data))


def data_digest(frames: dict[str, pd.DataFrame]) -> str:
    return tracking.dataset_digest(pd.concat(frames.values()))


def resume_state(cfg: TrainConfig, digest: str) -> dict | None:
    """The checkpoint to continue from (--resume [RUN_ID]); it must come from the same configuration and data."""
    if not cfg.resume:
        return None
    if not cfg.checkpoint_dir:
        raise BinCounterError("--resume needs a --checkpoint-dir")
    path = checkpoint.latest(cfg.checkpoint_dir) if cfg.resume == "latest" else \
        checkpoint.path_for(cfg.checkpoint_dir, cfg.resume)
    state = checkpoint.load(path)
    ignored = {"resume", "run_name", "register_as", "num_workers", "profile", "checkpoint_dir", "recipe"}
    mine = {k: v for k, v in as_params(cfg).items() if k not in ignored}
    theirs = {k: v for k, v in state["config"].items() if k not in ignored}
    if theirs.get("data_digest") != digest:
        raise BinCounterError(f"--resume: {path} was trained on other data than {cfg.data} holds now (dataset "
                              f"digest {theirs.get('data_digest') or 'unknown'} vs {digest}); start a new run")
    defaults = as_params(TrainConfig())  # a setting added since the checkpoint was written had its default then
    changed = sorted(k for k in mine if mine[k] != theirs.get(k, defaults.get(k)))
    if changed:
        raise BinCounterError(f"--resume: {path} was written with other settings ({', '.join(changed)}); "
                              "rerun with the original options")
    ensure_run_exists(state["run_id"], path)
    return state


def ensure_run_exists(run_id: str, path: Path) -> None:
    """Resuming continues the MLflow run; a store without it (another MLFLOW_TRACKING_URI, a job's lost local
    store) must stop here with one line, not halfway through training."""
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:  # not found, or the server cannot be reached
        raise BinCounterError(f"--resume: {path} continues run {run_id}, but the tracking store "
                              f"{redact_uri(mlflow.get_tracking_uri())} has no run {run_id} "
                              f"({redact_uri(one_line(exc))}); set MLFLOW_TRACKING_URI to the store that started it"
                              ) from None


def start_rules(frames: dict[str, pd.DataFrame], classes: list[int], tag_run: bool) -> Rules:
    rules = Rules()
    for finding in rules.check_labels(frames["train"]["count"], classes):
        log.warning("debugger: %s: %s", finding.rule, finding.message)
        if tag_run:
            mlflow.set_tag(*finding.as_tag())
    return rules


def calibration_images(cfg: TrainConfig, frames: dict[str, pd.DataFrame], count: int = 64) -> list[str]:
    """Training images whose activations set an int8 graph's ranges (none unless asked for, or when streaming)."""
    if not cfg.int8 or cfg.stream:
        return []
    train_frame = frames["train"]
    return list(train_frame.sample(min(count, len(train_frame)), random_state=cfg.seed)["abs_path"])


def example_images(cfg: TrainConfig, frames: dict[str, pd.DataFrame], tmp: Path) -> list[str]:
    """Candidates for the model's input example, the first readable two are used: every file of the test, val and
    train splits in that order (any may have gone since training), or the first two of a val shard."""
    if not cfg.stream:
        return [path for split in ("test", "val", "train") if split in frames for path in frames[split]["abs_path"]]
    from bin_counter.cloud.shards import samples, shard_urls
    from bin_counter.core.files import safe_join

    paths = []
    for sample in samples(shard_urls(cfg.data, "val")[0]):
        paths.append(safe_join(tmp, f"{sample['image_id']}.jpg"))
        paths[-1].write_bytes(sample["jpg"])
        if len(paths) == 2:
            break
    return [str(p) for p in paths]


def model_description(cfg: TrainConfig, test_metrics: dict | None) -> tuple[str, dict[str, str]]:
    """The logged model's `model_type` and tags: what tells one model from another in the Models tab."""
    tags = {"bin_counter.backbone": cfg.backbone, "bin_counter.recipe": cfg.recipe, "bin_counter.head": cfg.head,
            "bin_counter.image_size": str(cfg.image_size), "bin_counter.decode": cfg.decode}
    if test_metrics is not None:
        tags.update({f"test/{k}": f"{test_metrics[k]:.4f}" for k in metrics.HEADLINE})
    return f"{cfg.backbone} {cfg.recipe}", tags


def log_split_datasets(cfg: TrainConfig, frames: dict[str, pd.DataFrame]) -> dict:
    """train, val and test as three MLflow datasets of the run (the target is `count`), keyed by split."""
    source = cfg.data if cfg.data.startswith("s3://") else str(Path(cfg.data).resolve())
    return {split: tracking.log_dataset(frame, source, f"abid-{split}", context=split)
            for split, frame in frames.items()}


def log_test_report(report: reports.Report, frames, model_id, dataset) -> None:
    """The test split under the same keys and with the same plots as an `evaluate` run."""
    baseline = metrics.majority_baseline(frames["train"]["count"], frames["test"]["count"])
    mlflow.log_metric(metrics.metric_key("test", "majority_accuracy"), baseline, model_id=model_id, dataset=dataset)
    reports.log_report(report, "test", model_id, dataset)


def log_outcome(cfg: TrainConfig, model, loaders: Loaders, result: FitResult, frames, classes, device,
                save_model: bool, datasets: dict) -> tuple[dict | None, str | None, CountCalibration]:
    """History, test metrics and (optionally) the best epoch's model, into the active run."""
    if result.best_epoch == 0:
        raise BinCounterError(f"training stopped: {result.stopped}, before any epoch had a finite loss; "
                              "no model was kept. Lower --lr.")
    mlflow.log_metrics({"train/best_epoch": result.best_epoch, "val/best_loss": result.best_val["val_loss"]})
    if len(result.history) > 1:  # a solved head has one "epoch": nothing to draw a curve through
        tracking.log_figure(plots.history(result.history), "training_history.png")
    tracking.log_frame(result.history, "history")
    calibration = fit_calibration(cfg, loaders, result, classes, device)
    mlflow.log_metric("train/temperature", calibration.temperature)
    report = test_split_report(cfg, loaders, frames, classes, device, calibration)
    test_metrics = report.metrics if report else None
    model_info = None
    if save_model:
        config = {"backbone": cfg.backbone, "classes": classes, "image_size": cfg.image_size,
                  "best_epoch": result.best_epoch, "tta": cfg.tta, "decoding": cfg.decoding,
                  "int8": cfg.int8, "calibration": calibration.as_dict()}
        model_type, tags = model_description(cfg, test_metrics)
        with tempfile.TemporaryDirectory() as tmp:
            model_info = log_model(model.cpu(), config, example_images(cfg, frames, Path(tmp)),
                                   cfg.register_as, calibration_images(cfg, frames), model_type=model_type,
                                   tags=tags, device=cfg.serve_device)
        if cfg.register_as and model_info.registered_model_version:
            mlflow.MlflowClient().update_model_version(
                cfg.register_as, model_info.registered_model_version,
                reports.model_card(cfg, test_metrics, datasets, model_info.model_uri))
    if report is not None:
        log_test_report(report, frames, model_info.model_id if model_info else None, datasets.get("test"))
        log.info("test accuracy %.3f, macro F1 %.3f, MAE %.3f (best epoch %d)", test_metrics["accuracy"],
                 test_metrics["f1_macro"], test_metrics["mae"], result.best_epoch)
    return test_metrics, model_info.model_uri if model_info else None, calibration


def train(cfg: TrainConfig, on_epoch=None, save_model: bool = True, parent_run_id: str | None = None) -> TrainResult:
    """`bin-counter train`: one MLflow run with params, per-epoch metrics, plots, test metrics and the model.

    `on_epoch(epoch, row)` may raise (Optuna's pruning does); `save_model=False` skips logging the model (trials).
    SIGTERM/Ctrl-C stop it with the finished epochs checkpointed; `--resume` continues the same MLflow run.
    """
    cfg.validate()
    set_seed(cfg.seed)
    ctx = distributed.setup()  # under torchrun: one process per device, rank 0 alone talks to MLflow
    device = distributed.device(ctx) if ctx.enabled else pick_device()
    if ctx.main:
        ensure_data(cfg.data)
    distributed.barrier()
    classes = read_classes(s3.local_copy(cfg.data))
    frames = split_frames(cfg.data)
    check_counts(pd.concat(frames.values()), classes, cfg.data)
    digest = data_digest(frames)
    resumed = resume_state(cfg, digest)
    mlflow_run = tracking.run("train", parent_run_id, run_id=resumed["run_id"] if resumed else None,
                              title=cfg.run_name or tracking.run_title("train", cfg.backbone, cfg.recipe),
                              backbone=cfg.backbone, recipe=cfg.recipe) \
        if ctx.main else nullcontext()
    with mlflow_run as active:
        run_id = distributed.broadcast(active.info.run_id if active else None)
        if ctx.enabled and ctx.main:
            mlflow.log_param("world_size", ctx.world)
        model = create_model(cfg.backbone, len(classes), cfg.weights).to(device)
        trainable = freeze(model, cfg.unfreeze_last)
        if not resumed and ctx.main:  # a resumed run already has them
            tracking.log_params({**cfg.result_settings(), **trainable, "device": device.type,
                                 "classes": ",".join(map(str, classes))})
            mlflow.set_tag("dataset_digest", digest)
            mlflow.log_dict(cfg.reproducible(), "config.yaml")  # `train --config` it to train the same again
        datasets = log_split_datasets(cfg, frames) if ctx.main else {}
        rules = start_rules(frames, classes, tag_run=ctx.main)
        checkpointing = Checkpointing(checkpoint.path_for(cfg.checkpoint_dir, run_id), run_id, resumed, digest) \
            if cfg.checkpoint_dir else None
        try:
            fitter = {("logistic", False): solve_head, ("sgd", False): fit, ("sgd", True): profiled_fit,
                      ("logistic", True): functools.partial(profiled_solve, frame=frames["train"])}[
                cfg.head, cfg.profile]
            # feature extraction (in build_loaders) is the longest step of a solved head: a spot reclaim or Ctrl-C
            # there must end the run as KILLED too, not leave it RUNNING
            with checkpoint.interruptible():
                loaders = build_loaders(cfg, model, frames, classes, device)
                result = fitter(cfg, model, loaders, classes, device, on_epoch, rules, checkpointing=checkpointing,
                                log_epoch=log_epoch_to_run if ctx.main else None)
        except checkpoint.TrainingInterrupted as signal_name:
            if ctx.main:
                mlflow.end_run("KILLED")
            if checkpointing is not None and checkpointing.path.exists():
                raise BinCounterError(f"interrupted by {signal_name}: finished epochs are checkpointed in "
                                      f"{checkpointing.path}; rerun with --resume to continue run {run_id}") from None
            # nothing to resume: interrupted before the first epoch ended, or a solved head (it has no epochs)
            raise BinCounterError(f"interrupted by {signal_name} before anything was checkpointed; run {run_id} is "
                                  "marked KILLED: rerun the same command to start again") from None
        test_metrics, model_uri, calibration = None, None, None
        if ctx.main:
            test_metrics, model_uri, calibration = log_outcome(cfg, model, loaders, result, frames, classes, device,
                                                               save_model, datasets)
            if checkpointing:
                checkpointing.path.unlink(missing_ok=True)  # finished: nothing left to resume
        if result.stopped:  # raised inside the run, so MLflow marks it FAILED; the best epoch's model is kept
            raise BinCounterError(f"training stopped: {result.stopped}; the best epoch ({result.best_epoch}) was "
                                  f"kept as {model_uri or 'run ' + run_id}. Lower --lr.")
    distributed.finish()
    if ctx.main:
        print(f"run_id: {run_id}")
    return TrainResult(run_id, model_uri, test_metrics, result.best_epoch, result.history, calibration)
