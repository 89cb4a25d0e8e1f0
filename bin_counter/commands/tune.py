"""tune: an Optuna search, each trial a child MLflow run, then the chosen configuration trained by `train`.

The model search (the default) is over what the shipped model's accuracy depends on: the head (logistic | sgd),
the backbone (the EfficientNet-Lite weights installed), the image size, class balancing and the decoding
(argmax | expected | ordinal with its cost and tail boost); for the SGD head only, its batch size, lr and
epochs. Trial 0 is the default configuration. Every trial is scored by the same stratified k-fold split of
train+val (never test): the out-of-fold decoded accuracy (`--objective`), MAE breaking ties; a trial that leaves
a count with recall below 0.10 is not eligible. The decoding is applied to the out-of-fold probabilities of the
fitted head, so trials that differ only in decoding refit nothing, and trials share the frozen features per
(backbone, size, weights). The best eligible trial replaces the default only when its paired gain over the folds
exceeds two standard errors: with a few hundred images a handful of trials would otherwise pick noise.

The study's search (`--recipe study`, and always on SageMaker): batch size 32-128, learning rate 1e-4-5e-2 (log),
epochs 5-15; objective: the validation "Average loss", minimised. Trials share the frozen-backbone feature cache,
so after the first extraction a trial costs milliseconds per epoch.

A shared --storage lets several processes or machines run one study, and rerunning with the same storage and
study name resumes it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
import numpy as np
import optuna
import pandas as pd
import torch
from optuna.trial import TrialState
from sklearn.model_selection import train_test_split
from torch import nn

from bin_counter import BinCounterError, tracking
from bin_counter.cloud import s3
from bin_counter.commands.evaluate import evaluate_into_run, summary_lines
from bin_counter.commands.train import split_frames, train
from bin_counter.config import DECODES, TrainConfig, as_params
from bin_counter.config import TUNE_OBJECTIVES as OBJECTIVES
from bin_counter.core import choices, heads, metrics
from bin_counter.core.data import make_loader
from bin_counter.core.features import FeatureViews
from bin_counter.core.losses import make_criterion
from bin_counter.core.manifest import read_classes
from bin_counter.core.metrics import HEADLINE, metric_key
from bin_counter.core.models import (
    CountingModel,
    backbone_spec,
    classifier_head,
    create_model,
    freeze,
    installed_lite_backbones,
)
from bin_counter.core.training import Loaders, evaluate_epoch, fit, pick_device, split_features

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class BudgetReached(Exception):
    """Another worker sharing the storage already started the last trial of the budget."""


@dataclass
class SearchSpace:
    batch_size: tuple[int, int] = (32, 128)
    lr: tuple[float, float] = (1e-4, 5e-2)
    epochs: tuple[int, int] = (5, 15)

    def validate(self) -> None:
        for name, (low, high) in dataclasses.asdict(self).items():
            if not 0 < low <= high:
                raise BinCounterError(f"bad {name} range {low}-{high}: need 0 < low <= high")
        if self.batch_size[0] < 2:
            raise BinCounterError("batch size range must start at 2 or more (BatchNorm needs two samples)")

    def suggest(self, trial: optuna.Trial) -> dict:
        return {
            "batch_size": trial.suggest_int("batch_size", *self.batch_size),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "epochs": trial.suggest_int("epochs", *self.epochs),
        }


def parse_range(text: str, cast=float) -> tuple:
    try:
        low, high = (cast(float(part)) for part in text.split(","))
    except ValueError:
        raise BinCounterError(f"a range must look like LOW,HIGH (got {text!r})") from None
    return low, high


HEADS = tuple(choices.HEADS)
MIN_RECALL = 0.10  # a trial that gives up a count (recall below this) is not eligible


@dataclass
class ModelSpace:
    """What the shipped model depends on; the SGD head's batch size, lr and epochs come from the SearchSpace."""

    heads: tuple[str, ...] = HEADS
    backbones: tuple[str, ...] = ()  # (): the EfficientNet-Lite backbones whose weights are installed
    image_sizes: tuple[int, ...] = (224, 320)
    decodes: tuple[str, ...] = DECODES
    decode_cost: tuple[float, float] = (0.5, 4.0)
    decode_tail_boost: tuple[float, float] = (0.0, 1.5)

    def around(self, base: TrainConfig) -> ModelSpace:
        """This space widened to hold the default configuration, whose trial is enqueued first. With --weights
        the file fits one backbone only, so the backbone is not searched."""
        def with_base(values, value):
            return tuple(dict.fromkeys((*values, value)))

        def range_with(bounds, value):
            return min(bounds[0], value), max(bounds[1], value)

        backbones = (base.backbone,) if base.weights else self.backbones or tuple(installed_lite_backbones())
        return dataclasses.replace(
            self, heads=with_base(self.heads, base.head), backbones=with_base(backbones, base.backbone),
            image_sizes=tuple(sorted({*self.image_sizes, base.image_size})),
            decodes=with_base(self.decodes, base.decode),
            decode_cost=range_with(self.decode_cost, base.decode_cost),
            decode_tail_boost=range_with(self.decode_tail_boost, base.decode_tail_boost))

    def validate(self) -> None:
        for name, values, known in (("head", self.heads, HEADS), ("decode", self.decodes, DECODES)):
            if not values or set(values) - set(known):
                raise BinCounterError(f"bad {name} choices {','.join(values)}: choose from {', '.join(known)}")
        for backbone in self.backbones:
            backbone_spec(backbone)
        if not self.image_sizes or min(self.image_sizes) < 32:
            raise BinCounterError(f"bad image sizes {self.image_sizes}: need sizes of 32 px or more")
        for name in ("decode_cost", "decode_tail_boost"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise BinCounterError(f"bad {name} range {low}-{high}: need 0 <= low <= high")

    @staticmethod
    def default_params(base: TrainConfig) -> dict:
        """The default configuration as a point of the space: trial 0."""
        params = {"head": base.head, "backbone": base.backbone, "image_size": base.image_size,
                  "balance": base.balance, "decode": base.decode}
        if base.decode == "ordinal":
            params.update(decode_cost=base.decode_cost, decode_tail_boost=base.decode_tail_boost)
        if base.head == "sgd":
            params.update(batch_size=base.batch_size, lr=base.lr, epochs=base.epochs)
        return params

    def suggest(self, trial: optuna.Trial, sgd: SearchSpace) -> dict:
        """A conditional space: decoding costs for the ordinal decoding, batch/lr/epochs for the SGD head."""
        params = {"head": trial.suggest_categorical("head", self.heads),
                  "backbone": trial.suggest_categorical("backbone", self.backbones),
                  "image_size": trial.suggest_categorical("image_size", self.image_sizes),
                  "balance": trial.suggest_categorical("balance", (True, False)),
                  "decode": trial.suggest_categorical("decode", self.decodes)}
        if params["decode"] == "ordinal":
            params["decode_cost"] = trial.suggest_float("decode_cost", *self.decode_cost)
            params["decode_tail_boost"] = trial.suggest_float("decode_tail_boost", *self.decode_tail_boost)
        if params["head"] == "sgd":
            params.update(sgd.suggest(trial))
        return params


@dataclass
class TuneConfig:
    base: TrainConfig
    space: SearchSpace  # the study's search; in the model search, the SGD head's ranges
    n_trials: int = 5
    n_jobs: int = 1
    storage: str | None = None
    study_name: str = "bin-counter"
    seed: int = 0
    register_as: str | None = None
    search: str = "model"  # or "study": the reference study's search, exactly
    objective: str = "accuracy"
    folds: int = 5
    model: ModelSpace = field(default_factory=ModelSpace)

    def __post_init__(self):
        if self.search == "model":  # trial 0, the default configuration, must be a point of the space
            self.model = self.model.around(self.base)


STORAGE_RETRY_SECONDS = 90


def _lost_connection(exc: BaseException) -> bool:
    """A failure for want of a database connection (a restart, a network blip), not a bad query or data."""
    import sqlalchemy.exc

    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or bool(
        getattr(cause, "connection_invalidated", False))


def _retry_on_lost_connection(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        deadline, delay = time.monotonic() + STORAGE_RETRY_SECONDS, 0.5
        while True:
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if not _lost_connection(exc) or time.monotonic() + delay > deadline:
                    raise
                reason = (str(exc.__cause__ or exc).strip().splitlines() or ["?"])[0]
                log.warning("Optuna storage unreachable (%s); retrying in %.1f s", tracking.redact_uri(reason), delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    return wrapper


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """An RDBStorage that outlives a database restart: pooled connections are pinged before use (Optuna does that
    for MySQL only) and an operation that failed for want of a connection is retried for STORAGE_RETRY_SECONDS.

    A write whose commit succeeded but whose answer was lost would be repeated: that window is the instant of the
    restart itself, and the heartbeat retries a trial left RUNNING by it."""


# Every operation that opens its own session, private ones included (Optuna's cache calls _create_new_trial,
# _get_trials, ...); not the helpers handed a session, whose broken connection a retry could not replace.
for _name, _member in list(vars(optuna.storages.RDBStorage).items()):
    if (inspect.isfunction(_member) and not _name.startswith("__")
            and not {"session", "trial"} & set(inspect.signature(_member).parameters)):
        setattr(ReconnectingRDBStorage, _name, _retry_on_lost_connection(_member))


def refuse_password_in(storage: str | None) -> None:
    """A password in --storage is logged by MLflow (`mlflow run -P storage=...`, declared or not), printed in its
    command line and readable in the process list before we could mask it: it may only come from libpq's files."""
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        url = sqlalchemy.engine.make_url(storage) if storage else None
    except sqlalchemy.exc.ArgumentError:
        return  # not a URL at all: open_study says so
    query = "?" + storage.partition("?")[2] if storage else ""  # ?password= is libpq's too
    if url is not None and (url.password is not None or tracking.has_credentials(query)):
        raise BinCounterError(
            f"--storage {tracking.redact_uri(storage)} carries a password, which would be logged and shown on "
            "command lines: drop it from the URL and give it to libpq in a PGPASSFILE (host:port:database:user:"
            "password lines, mode 0600; default ~/.pgpass) or PGPASSWORD")


def open_study(cfg: TuneConfig, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create or resume the study; by default a pruner stops trials whose validation loss lags the median."""
    # Workers sharing a storage must not draw the same "random" trials, so each mixes its process id into the
    # seed; a study in one process stays exactly reproducible.
    seed = cfg.seed if not cfg.storage else cfg.seed * 1_000_003 + os.getpid()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat API
    if cfg.search == "study":
        sampler, direction = optuna.samplers.TPESampler(seed=seed), "minimize"
    else:  # an ineligible trial (a count given up) is infeasible, so TPE learns to avoid its region
        sampler = optuna.samplers.TPESampler(
            seed=seed, constraints_func=lambda t: [MIN_RECALL - t.user_attrs.get("min_recall", MIN_RECALL)])
        direction = OBJECTIVES[cfg.objective]
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    last_error = None
    for attempt in range(3):  # workers starting together race to create the tables of a new storage
        try:
            storage = None
            if cfg.storage:
                # A worker that dies mid-trial stops sending heartbeats; its trial is then failed and retried.
                # a database server can restart under the workers; a sqlite file has no connection to lose, and its
                # errors (a missing folder) must fail at once
                server = not cfg.storage.startswith("sqlite")
                storage_class = ReconnectingRDBStorage if server else optuna.storages.RDBStorage
                storage = storage_class(
                    cfg.storage, engine_kwargs={"pool_pre_ping": True} if server else None,
                    heartbeat_interval=60, grace_period=180,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction=direction,
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            break
        except Exception as exc:  # sqlalchemy / driver errors: an unreachable or malformed URL, or that race
            last_error = exc
            time.sleep(0.5 + attempt)
    else:
        reason = (str(last_error).strip().splitlines() or [type(last_error).__name__])[0]
        raise BinCounterError(tracking.redact_uri(f"cannot open Optuna storage {cfg.storage!r}: {reason}"))
    return claimed(study, cfg)


def claimed(study: optuna.Study, cfg: TuneConfig) -> optuna.Study:
    """The study, marked with its search (a study made before the model search existed is the study's search);
    the model search's first trial is the default configuration."""
    kind = study.user_attrs.get("search") or ("study" if study.trials else None)
    if kind is None:
        study.set_user_attr("search", cfg.search)
    elif kind != cfg.search or (kind == "model" and study.user_attrs.get("objective") != cfg.objective):
        raise BinCounterError(f"study {cfg.study_name!r} in {tracking.redact_uri(cfg.storage or 'memory')} ran "
                              f"another search ({kind}, {study.user_attrs.get('objective') or 'Average loss'}); "
                              "choose another --study-name")
    if cfg.search == "model":
        study.set_user_attr("objective", cfg.objective)
        if not study.trials:
            study.enqueue_trial(ModelSpace.default_params(cfg.base), user_attrs={"default": True},
                                skip_if_exists=True)
    return study


def check_budget(trial: optuna.Trial, n_trials: int) -> None:
    """Trial numbers are handed out atomically by the storage, so workers agree on who came first."""
    study = trial.study
    earlier = [t for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
               if t.number < trial.number]
    if len(earlier) >= n_trials:
        study.stop()
        raise BudgetReached(f"trial {trial.number} not run: the study already has {n_trials} trials")


def objective_for(cfg: TuneConfig, parent_run_id: str):
    """The study's search: each trial a `train` of the SGD head, pruned on its per-epoch validation loss."""
    def objective(trial: optuna.Trial) -> float:
        check_budget(trial, cfg.n_trials)
        params = cfg.space.suggest(trial)
        trial_cfg = dataclasses.replace(cfg.base, **params, run_name=f"trial-{trial.number}", register_as=None,
                                        checkpoint_dir=None)
        trial.set_user_attr("study", cfg.study_name)
        run_ids = []

        def report(epoch: int, row: dict) -> None:
            run_ids.append(mlflow.active_run().info.run_id)
            trial.report(row["val_loss"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {row['val_loss']:.4f} at epoch {epoch} lags the median")

        try:
            result = train(trial_cfg, pruner=report, save_model=False, parent_run_id=parent_run_id)
        except optuna.TrialPruned:
            client = mlflow.MlflowClient()
            client.set_tag(run_ids[-1], "trial_state", "PRUNED")
            client.set_terminated(run_ids[-1], "KILLED")
            raise
        mlflow.MlflowClient().set_tag(result.run_id, "trial_state", "COMPLETE")
        return float(result.history["val_loss"].min())

    return objective


@dataclass
class Score:
    """One trial on the folds: the objective over all out-of-fold predictions, per fold, and the figures that
    break ties and decide eligibility."""

    value: float
    per_fold: list[float]
    accuracy: float
    mae: float
    f1_macro: float
    min_recall: float

    @property
    def eligible(self) -> bool:
        return self.min_recall >= MIN_RECALL


@dataclass
class Folds:
    """The k-fold protocol every model-search trial is scored by: train+val of one DATA_DIR (never test), one
    stratified split, and the frozen features of each (backbone, size, weights, views) pass, computed once per
    process by `extract(cfg, augmented)` (through the on-disk cache) or given (a synthetic problem)."""

    classes: list[int]
    labels: torch.Tensor  # class indices, one per image
    splits: list[tuple[np.ndarray, np.ndarray]]
    extract: Callable[[TrainConfig, bool], torch.Tensor] | None = None
    features: dict = field(default_factory=dict)
    _probs: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, labels: torch.Tensor, classes: list[int], folds: int, seed: int, **kwargs) -> Folds:
        splits = heads.stratified_folds(labels, folds, seed)
        if not splits:
            raise BinCounterError("tune scores every trial by k-fold over train+val: each count needs at least two "
                                  "images there")
        return cls(classes, labels.long(), splits, **kwargs)

    @staticmethod
    def key(cfg: TrainConfig, augmented: bool) -> tuple:
        """The feature passes trials share; the base's other switches (views, rotation, TTA) are fixed."""
        return cfg.backbone, cfg.image_size, cfg.weights or "", "train views" if augmented else "eval views"

    def features_of(self, cfg: TrainConfig, augmented: bool) -> torch.Tensor:
        with self._lock:  # parallel trials wait for one extraction instead of running it twice
            key = self.key(cfg, augmented)
            if key not in self.features:
                self.features[key] = self.extract(cfg, augmented)
            return self.features[key]

    @property
    def passes(self) -> int:
        return len(self.features)

    def probabilities(self, cfg: TrainConfig, on_fold=None) -> np.ndarray:
        """Out-of-fold class probabilities of the head `cfg` describes; the decoding is not part of it, so trials
        that differ only there share one fit."""
        key = tuple(sorted((k, v) for k, v in as_params(cfg).items()
                           if k not in ("decode", "decode_cost", "decode_tail_boost", "run_name")))
        if key not in self._probs:
            self._probs[key] = self._sgd(cfg, on_fold) if cfg.head == "sgd" else self._logistic(cfg)
        return self._probs[key]

    def _logistic(self, cfg: TrainConfig) -> np.ndarray:
        """The same solve as `train`'s (C chosen by these folds); its out-of-fold probabilities."""
        fitted = heads.fit_logistic(self.features_of(cfg, False), self.labels, len(self.classes), balance=cfg.balance,
                                    seed=cfg.seed, splits=self.splits)
        return fitted.oof_probs

    def _sgd(self, cfg: TrainConfig, on_fold=None) -> np.ndarray:
        """`train`'s fit of the SGD head on each fold's training images (the epoch kept on a stratified tenth of
        them, as `train` keeps it on val), scored on the held-out fold."""
        augmented, evaluation = self.features_of(cfg, True), self.features_of(cfg, False)
        probs = np.zeros((len(self.labels), len(self.classes)))
        device = pick_device()
        for k, (train_idx, held_idx) in enumerate(self.splits):
            fit_idx, val_idx = inner_split(train_idx, self.labels, len(self.classes), cfg.seed)
            head = classifier_head(augmented.shape[-1], len(self.classes)).to(device)
            loaders = Loaders(head, self._loader(augmented, fit_idx, cfg, train=True),
                              self._loader(evaluation, val_idx, cfg), None,
                              [self.classes[i] for i in self.labels[fit_idx]])
            fit(cfg, CountingModel(nn.Identity(), head), loaders, self.classes, device)
            held = evaluate_epoch(head, make_criterion(cfg, self.classes, loaders.train_counts).to(device),
                                  self._loader(evaluation, held_idx, cfg), device, cfg.tta)
            probs[held_idx[held["rows"]]] = held["probs"]
            if on_fold is not None:
                on_fold(k, probs)
        return probs

    def _loader(self, features: torch.Tensor, rows: np.ndarray, cfg: TrainConfig, train: bool = False):
        dataset = FeatureViews(features[rows], self.labels[rows], torch.ones(len(rows), dtype=torch.bool),
                               random_view=train, all_views=not train)
        return make_loader(dataset, cfg.batch_size, shuffle=train, num_workers=0, seed=cfg.seed, drop_last=train,
                           collate_fn=None)

    def score(self, probs: np.ndarray, cfg: TrainConfig, objective: str, folds: int | None = None) -> Score:
        """The decoded counts of `probs` scored over the first `folds` folds (all by default)."""
        truth = np.asarray(self.classes)[self.labels.numpy()]
        predicted = metrics.decode(probs, self.classes, **cfg.decoding)
        splits = self.splits[:folds]
        held = np.concatenate([h for _, h in splits])
        every = metrics.classification_metrics(truth[held], predicted[held], self.classes)
        per_fold = [metrics.classification_metrics(truth[h], predicted[h], self.classes)[objective] for _, h in splits]
        return Score(every[objective], per_fold, every["accuracy"], every["mae"], every["f1_macro"],
                     float(every["per_class"]["recall"].min()))


def inner_split(rows: np.ndarray, labels: torch.Tensor, num_classes: int, seed: int):
    """A stratified tenth of `rows` to keep the best epoch on (unstratified when a count has a single image)."""
    present = torch.bincount(labels[rows], minlength=num_classes)
    stratify = labels[rows].numpy() if present[present > 0].min() >= 2 else None
    size = max(round(0.1 * len(rows)), num_classes if stratify is not None else 1)
    return train_test_split(rows, test_size=size, random_state=seed, stratify=stratify)


def image_folds(cfg: TuneConfig) -> Folds:
    """The Folds of the DATA_DIR's train+val images, their features extracted by `train`'s own code."""
    classes = read_classes(s3.local_copy(cfg.base.data))
    frames = split_frames(cfg.base.data)
    frame = pd.concat([frames["train"], frames["val"]], ignore_index=True)
    labels = torch.tensor([classes.index(int(c)) for c in frame["count"]])
    device = pick_device()

    def extract(trial_cfg: TrainConfig, augmented: bool) -> torch.Tensor:
        model = create_model(trial_cfg.backbone, len(classes), trial_cfg.weights).to(device)
        freeze(model, 0)
        features, ok = split_features(trial_cfg, model, frame, classes, device, augmented, "train+val")
        if not ok.all():
            raise BinCounterError(f"{int((~ok).sum())} train/val images of {cfg.base.data} cannot be read any more; "
                                  "prepare the data again")
        return features

    return Folds.of(labels, classes, cfg.folds, cfg.base.seed, extract=extract)


def model_objective(cfg: TuneConfig, folds: Folds, parent_run_id: str):
    """The model search: each trial's configuration scored on the folds, a child run with its figures."""
    space = cfg.model

    def objective(trial: optuna.Trial) -> float:
        check_budget(trial, cfg.n_trials)
        params = space.suggest(trial, cfg.space)
        is_default = bool(trial.user_attrs.get("default"))
        trial_cfg = dataclasses.replace(cfg.base, **params, run_name=f"trial-{trial.number}", register_as=None,
                                        checkpoint_dir=None)

        def on_fold(k: int, probs: np.ndarray) -> None:  # the SGD head is fitted fold by fold: prune between
            trial.report(float(np.mean(folds.score(probs, trial_cfg, cfg.objective, k + 1).per_fold)), k + 1)
            if not is_default and trial.should_prune():
                raise optuna.TrialPruned(f"{cfg.objective} after fold {k + 1} lags the median")

        run_id, passes, start = None, folds.passes, time.perf_counter()
        try:
            with tracking.run(f"trial-{trial.number}", parent_run_id, title=f"trial-{trial.number}",
                              trial_state="RUNNING") as run:
                run_id = run.info.run_id
                tracking.log_params(as_params(trial_cfg))
                try:
                    score = scored(trial, trial_cfg, folds.probabilities(trial_cfg, on_fold))
                finally:  # what the trial cost, pruned or not; 0 new passes: its features were shared
                    trial.set_user_attr("new_feature_passes", folds.passes - passes)
                    trial.set_user_attr("seconds", time.perf_counter() - start)
        except optuna.TrialPruned:
            client = mlflow.MlflowClient()
            client.set_tag(run_id, "trial_state", "PRUNED")
            client.set_terminated(run_id, "KILLED")
            raise
        log.info("trial %d%s: %s %.4f (MAE %.3f, lowest recall %.2f) with %s", trial.number,
                 " (the default)" if is_default else "", cfg.objective, score.value, score.mae, score.min_recall,
                 params)
        return score.value

    def scored(trial: optuna.Trial, trial_cfg: TrainConfig, probs: np.ndarray) -> Score:
        """The trial's figures into its user attributes (the decision reads them) and its run."""
        score = folds.score(probs, trial_cfg, cfg.objective)
        if trial_cfg.head != "sgd":  # solved in one go: its per-fold values for the history, never pruned
            for k in range(len(score.per_fold)):
                trial.report(float(np.mean(score.per_fold[:k + 1])), k + 1)
        for name in ("accuracy", "mae", "f1_macro", "min_recall"):
            trial.set_user_attr(name, getattr(score, name))
        trial.set_user_attr("fold_values", score.per_fold)
        trial.set_user_attr("eligible", score.eligible)
        mlflow.log_metrics({metric_key("oof", k): getattr(score, k)
                            for k in ("accuracy", "mae", "f1_macro", "min_recall")})
        mlflow.set_tags({"trial_state": "COMPLETE", "eligible": str(score.eligible),
                         "default_configuration": str(bool(trial.user_attrs.get("default")))})
        return score

    return objective


@dataclass
class Decision:
    """The default's trial against the best eligible one, paired over the folds."""

    default: optuna.trial.FrozenTrial
    best: optuna.trial.FrozenTrial
    gain: float  # mean per-fold improvement of best over default (in the objective's better direction)
    standard_error: float
    replaced: bool

    @property
    def chosen(self) -> optuna.trial.FrozenTrial:
        return self.best if self.replaced else self.default


def paired_gain(default: list[float], best: list[float], maximize: bool) -> tuple[float, float]:
    """Mean and standard error of the per-fold differences (positive: best is better)."""
    diff = (np.asarray(best) - np.asarray(default)) * (1 if maximize else -1)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    return float(diff.mean()), se


def decide(study: optuna.Study, objective: str) -> Decision:
    """The best eligible trial (the objective, then MAE or accuracy breaking ties) replaces the default only when
    its paired gain over the folds exceeds two standard errors."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    default = next((t for t in complete if t.user_attrs.get("default")), None)
    if default is None:
        raise BinCounterError("the default configuration's trial (trial 0) did not complete; see its run's error")
    maximize = OBJECTIVES[objective] == "maximize"

    def rank(t):
        tie = t.user_attrs["mae"] if objective != "mae" else -t.user_attrs["accuracy"]
        return (-t.value if maximize else t.value), tie, t.number

    eligible = [t for t in complete if t.user_attrs.get("eligible")] or [default]
    best = min(eligible, key=rank)
    gain, se = paired_gain(default.user_attrs["fold_values"], best.user_attrs["fold_values"], maximize)
    return Decision(default, best, gain, se, best.number != default.number and gain > 0 and gain > 2 * se)


def log_decision(decision: Decision, objective: str) -> None:
    """The default's trial beside the best, per fold, in the parent run."""
    default, best = decision.default, decision.best
    mlflow.log_params({**{f"default_{k}": v for k, v in default.params.items()},
                       **{f"best_{k}": v for k, v in best.params.items()}})
    mlflow.log_metrics({"default/value": default.value, "best/value": best.value, "tune/best_trial": best.number,
                        "tune/paired_gain": decision.gain, "tune/paired_standard_error": decision.standard_error,
                        "default/mae": default.user_attrs["mae"], "best/mae": best.user_attrs["mae"]})
    chosen = f"trial {best.number}" if decision.replaced else f"the default (trial {default.number})"
    mlflow.set_tag("chosen", chosen)
    table = pd.DataFrame({"fold": range(1, len(default.user_attrs["fold_values"]) + 1),
                          f"default_{objective}": default.user_attrs["fold_values"],
                          f"best_{objective}": best.user_attrs["fold_values"]})
    table["difference"] = table[f"best_{objective}"] - table[f"default_{objective}"]
    tracking.log_frame(table, "default_vs_best")
    print(f"default (trial {default.number}): {objective} {default.value:.4f}, MAE {default.user_attrs['mae']:.3f}")
    print(f"best (trial {best.number}): {objective} {best.value:.4f}, MAE {best.user_attrs['mae']:.3f} with "
          f"{best.params}")
    print(f"paired gain over {len(table)} folds: {decision.gain:+.4f} ± {decision.standard_error:.4f} (1 s.e.); "
          f"chosen: {chosen}" + ("" if decision.replaced or best.number == default.number
                                 else " (the gain is within two standard errors: noise, not a better model)"))


def log_study_plots(study: optuna.Study) -> None:
    from optuna.visualization import matplotlib as ov

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    tracking.log_figure(ov.plot_optimization_history(study).figure, "optimization_history.png")
    if len([t for t in study.trials if t.state == TrialState.COMPLETE]) >= 2:
        try:
            tracking.log_figure(ov.plot_param_importances(study).figure, "param_importances.png")
        except (RuntimeError, ValueError) as exc:  # all trials alike: importance undefined
            log.info("no parameter-importance plot: %s", exc)
    frame = study.trials_dataframe(attrs=("number", "value", "params", "state", "user_attrs"))
    tracking.log_frame(frame.drop(columns=["user_attrs_fold_values"], errors="ignore"), "trials")


def study_params(cfg: TuneConfig) -> dict:
    """The parent run's params; the storage URL without its password (a param is readable by anyone with the run)."""
    params = {"n_trials": cfg.n_trials, "backbone": cfg.base.backbone, "study_name": cfg.study_name,
              "storage": tracking.redact_uri(cfg.storage) if cfg.storage else "in-memory", "search": cfg.search,
              **{f"space_{k}": f"{v[0]}-{v[1]}" for k, v in dataclasses.asdict(cfg.space).items()}}
    if cfg.search == "model":
        params.update({"objective": cfg.objective, "folds": cfg.folds, "min_recall": MIN_RECALL,
                       **{f"space_{k}": ",".join(map(str, v)) if k in ("heads", "backbones", "image_sizes", "decodes")
                          else f"{v[0]}-{v[1]}" for k, v in dataclasses.asdict(cfg.model).items()}})
    return params


def validate(cfg: TuneConfig) -> None:
    cfg.space.validate()
    backbone_spec(cfg.base.backbone)  # unknown names fail before any work
    cfg.base.validate()
    if cfg.n_trials < 1:
        raise BinCounterError("--n-trials must be >= 1")
    refuse_password_in(cfg.storage)
    if cfg.search == "study":
        if cfg.base.head != "sgd":
            raise BinCounterError("the study's search is over the SGD head's batch size, lr and epochs: use "
                                  "--recipe study (or --head sgd)")
        return
    if cfg.objective not in OBJECTIVES:
        raise BinCounterError(f"unknown objective {cfg.objective!r}; choose from {', '.join(OBJECTIVES)}")
    if cfg.folds < 2:
        raise BinCounterError("--folds must be >= 2")
    if cfg.base.unfreeze_last or cfg.base.stream:
        raise BinCounterError("the model search scores frozen features of image files: not with --unfreeze-last "
                              "or --stream (use --recipe study)")
    cfg.model.validate()


def optimize(study: optuna.Study, objective, cfg: TuneConfig) -> None:
    """N trials in all, not N per worker: MaxTrialsCallback stops a worker once N have finished anywhere, and the
    objective refuses a trial that a concurrent worker's started trials already make one too many."""
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done:
        log.info("resuming study %r: %d of %d trials already finished", cfg.study_name, done, cfg.n_trials)
    try:
        study.optimize(objective, n_trials=max(cfg.n_trials - done, 0), n_jobs=cfg.n_jobs,
                       callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=FINISHED)],
                       catch=(BudgetReached,))
    except Exception as exc:
        if not _lost_connection(exc):
            raise
        reason = (str(exc.__cause__ or exc).strip().splitlines() or ["?"])[0]
        raise BinCounterError(tracking.redact_uri(
            f"lost the Optuna storage {cfg.storage} for over {STORAGE_RETRY_SECONDS} s ({reason}); rerun the same "
            "command to resume the study")) from None
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise BinCounterError("no trial completed; widen the search space or add trials")


def search_study(cfg: TuneConfig, study: optuna.Study, parent_run_id: str) -> tuple[optuna.trial.FrozenTrial, str]:
    """The study's search; the best trial's parameters, trained as the study did."""
    optimize(study, objective_for(cfg, parent_run_id), cfg)
    best = study.best_trial
    print(f"best trial {best.number}: Average loss: {best.value:.4f} with {best.params}")
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.log_metric("best/value", best.value)
    return best, "best"


def search_model(cfg: TuneConfig, study: optuna.Study, parent_run_id: str, folds: Folds | None = None
                 ) -> tuple[optuna.trial.FrozenTrial, str]:
    """The model search; the chosen configuration (the default unless a trial is better beyond the noise)."""
    folds = folds or image_folds(cfg)
    start = time.perf_counter()
    optimize(study, model_objective(cfg, folds, parent_run_id), cfg)
    decision = decide(study, cfg.objective)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    mlflow.log_metrics({"tune/feature_passes": folds.passes, "tune/search_seconds": time.perf_counter() - start})
    print(f"{finished} trials, {folds.passes} distinct feature passes, {time.perf_counter() - start:.1f} s")
    log_decision(decision, cfg.objective)
    return decision.chosen, "chosen"


def tune(cfg: TuneConfig, folds: Folds | None = None) -> dict:
    """`bin-counter tune --backend local`: search, then train the chosen configuration with `train` (on train+val
    for the logistic head, as `train` does), register it with --register-as and evaluate it on test."""
    validate(cfg)
    study = open_study(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tracking.run("tune", study=cfg.study_name) as parent:
        tracking.log_params(study_params(cfg))
        searched = search_study if cfg.search == "study" else functools.partial(search_model, folds=folds)
        chosen, run_name = searched(cfg, study, parent.info.run_id)
        mlflow.log_metrics({"tune/trials_complete": len(study.get_trials(deepcopy=False,
                                                                         states=(TrialState.COMPLETE,))),
                            "tune/trials_pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))})
        log_study_plots(study)

        chosen_cfg = dataclasses.replace(cfg.base, **chosen.params, run_name=run_name, register_as=cfg.register_as)
        result = train(chosen_cfg)
        report = evaluate_into_run(result.run_id, result.model_uri, chosen_cfg.data)
        mlflow.log_metrics({metric_key("test", k): report.metrics[k] for k in HEADLINE})  # the chosen model's
        mlflow.set_tag("best_model_uri", result.model_uri)
        print(f"{run_name} configuration on test: {summary_lines(report.metrics)}")
        print(f"run_id: {parent.info.run_id}")
    best_value = mlflow.get_run(parent.info.run_id).data.metrics["best/value"]
    return {"best_params": chosen.params, "best_value": best_value, "chosen_trial": chosen.number,
            "model_uri": result.model_uri, "test": report.metrics, "parent_run_id": parent.info.run_id}
