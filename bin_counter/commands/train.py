"""train: the `train` command, one MLflow run around the loop of core.training: its params, datasets, per-epoch
metrics and the study's printed lines, its reports, the model."""
from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from bin_counter import BinCounterError, one_line, plots, reports, tracking
from bin_counter.cloud import s3
from bin_counter.config import TrainConfig, as_params
from bin_counter.core import checkpoint, distributed, heads, metrics
from bin_counter.core.answers import answer_frame
from bin_counter.core.calibration import CountCalibration
from bin_counter.core.data import eval_transform, train_transform
from bin_counter.core.debugger import Rules
from bin_counter.core.losses import make_criterion
from bin_counter.core.manifest import check_counts, read_classes, read_manifest
from bin_counter.core.models import CountingModel, create_model, freeze
from bin_counter.core.profiling import Profile, profiler_findings, write_report
from bin_counter.core.training import (
    NO_RECORD,
    Checkpointing,
    FitResult,
    Loaders,
    Recorder,
    build_loaders,
    evaluate_epoch,
    fit_calibration,
    head_fitter,
    pick_device,
    set_seed,
)
from bin_counter.core.uris import redact_uri
from bin_counter.serving.packaging import log_model

log = logging.getLogger(__name__)


def stream_loaders(cfg: TrainConfig, model: CountingModel, frames: dict[str, pd.DataFrame],
                   classes: list[int]) -> Loaders:
    """Shards read front to back (local or S3): for data larger than the disk; the full forward pass every epoch."""
    from bin_counter.cloud.shards import ShardStream, shard_urls, stream_collate

    eval_tf = eval_transform(cfg.backbone, cfg.image_size)
    train_tf = train_transform(cfg.backbone, cfg.image_size, cfg.rotation_degrees, cfg.hflip)
    loaders = {}
    for split in frames:
        training = split == "train"
        dataset = ShardStream(shard_urls(cfg.data, split), classes, train_tf if training else eval_tf,
                              shuffle=training, seed=cfg.seed)
        loaders[split] = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                    collate_fn=stream_collate, pin_memory=torch.cuda.is_available())
    return Loaders(model, loaders["train"], loaders["val"], loaders.get("test"), list(frames["train"]["count"]))


def data_loaders(cfg: TrainConfig, model: CountingModel, frames: dict[str, pd.DataFrame], classes: list[int],
                 device: torch.device) -> Loaders:
    return stream_loaders(cfg, model, frames, classes) if cfg.stream else \
        build_loaders(cfg, model, frames, classes, device)


# the history's columns under the metric vocabulary (metrics.metric_key): the split first
EPOCH_METRICS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "val_loss": "val/loss",
                 "val_accuracy": "val/accuracy", "val_precision": "val/precision_macro",
                 "val_recall": "val/recall_macro", "val_f1": "val/f1_macro", "val_mae": "val/mae",
                 "grad_norm": "train/grad_norm", "grad_norm_max": "train/grad_norm_max",
                 "epoch_seconds": "train/epoch_seconds", "images_per_s": "train/images_per_s", "head_c": "train/head_c"}


class RunRecorder(Recorder):
    """The loop's reports into the active MLflow run (metrics, the debugger's findings as tags), and on stdout the
    study's lines, which SageMaker reads its metrics from (metrics.STUDY_REGEXES)."""

    def __init__(self, epochs: int, solved: bool):
        self.epochs, self.solved = epochs, solved

    def epoch(self, epoch: int, row: dict, findings: list) -> None:
        if not self.solved:
            print(f"Epoch {epoch}/{self.epochs}  Train loss: {row['train_loss']:.4f}  "
                  f"Train accuracy: {row['train_accuracy']:.4f}")
        val = {EPOCH_METRICS[k].removeprefix("val/"): v for k, v in row.items()
               if EPOCH_METRICS.get(k, "").startswith("val/")}
        print(metrics.study_lines(val["loss"], val), flush=True)
        mlflow.log_metrics({EPOCH_METRICS.get(k, f"train/{k}"): v for k, v in row.items()
                            if k != "epoch" and np.isfinite(v)}, step=epoch)
        for finding in findings:
            mlflow.set_tag(*finding.as_tag())

    def head_solved(self, fitted: heads.LogisticFit, images: int, seconds: float) -> None:
        scores = ", ".join(f"{c:g}: {v:.3f}" for c, v in fitted.cv_log_loss.items())
        print(f"Logistic head: C={fitted.c:g} (cross-validated held-out log-loss per C: "
              f"{scores or 'not cross-validated'}), {images} images, {seconds:.1f} s")


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


def report_test_split(cfg: TrainConfig, loaders: Loaders, frames: dict[str, pd.DataFrame], classes: list[int],
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


def fit_head(cfg: TrainConfig, model: CountingModel, loaders: Loaders, frames: dict[str, pd.DataFrame],
             classes: list[int], device: torch.device, **hooks) -> FitResult:
    """The head's fit (core.choices.HEADS); with --profile under the profiler, its report and findings into the
    active run."""
    if not cfg.profile:
        return head_fitter(cfg.head)(cfg, model, loaders, classes, device, **hooks)
    with tempfile.TemporaryDirectory(prefix="bin-counter-profile-") as tmp:
        result, profile = head_fitter(cfg.head, profiled=True)(cfg, model, loaders, classes, device, Path(tmp),
                                                               frames["train"], **hooks)
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
        from bin_counter.commands.prepare import build_data_dir
        from bin_counter.config import PrepareConfig

        log.info("no data at %s: preparing the bundled ABID sample there first", data)
        build_data_dir(PrepareConfig(source="sample", out=data))


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
    report = report_test_split(cfg, loaders, frames, classes, device, calibration)
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


def train(cfg: TrainConfig, pruner=None, save_model: bool = True, parent_run_id: str | None = None) -> TrainResult:
    """`bin-counter train`: one MLflow run with params, per-epoch metrics, plots, test metrics and the model.

    `pruner(epoch, row)` follows each kept epoch and may raise to stop there (Optuna's pruning does);
    `save_model=False` skips logging the model (trials).
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
        checkpointing = Checkpointing(checkpoint.path_for(cfg.checkpoint_dir, run_id), run_id, resumed,
                                      {**as_params(cfg), "data_digest": digest}) if cfg.checkpoint_dir else None
        recorder = RunRecorder(cfg.epochs, cfg.solved_head) if ctx.main else NO_RECORD
        try:
            # feature extraction (in build_loaders) is the longest step of a solved head: a spot reclaim or Ctrl-C
            # there must end the run as KILLED too, not leave it RUNNING
            with checkpoint.interruptible():
                loaders = data_loaders(cfg, model, frames, classes, device)
                result = fit_head(cfg, model, loaders, frames, classes, device, rules=rules,
                                  checkpointing=checkpointing, recorder=recorder, pruner=pruner)
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
