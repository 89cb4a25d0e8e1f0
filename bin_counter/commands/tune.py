"""tune: the study's hyperparameter search with Optuna, each trial a child MLflow run.

Search space (the study's): batch size 32-128, learning rate 1e-4-5e-2 (log), epochs 5-15; objective: the
validation "Average loss", minimised. Trials share the frozen-backbone feature cache, so after the first
extraction a trial costs milliseconds per epoch. A shared --storage lets several processes or machines run one
study, and rerunning with the same storage and study name resumes it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import time
import warnings
from dataclasses import dataclass

import mlflow
import optuna
from optuna.trial import TrialState

from bin_counter import BinCounterError, tracking
from bin_counter.commands.evaluate import evaluate_into_run, summary_lines
from bin_counter.commands.train import train
from bin_counter.config import TrainConfig
from bin_counter.core.models import backbone_spec

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


@dataclass
class TuneConfig:
    base: TrainConfig
    space: SearchSpace
    n_trials: int = 5
    n_jobs: int = 1
    storage: str | None = None
    study_name: str = "bin-counter"
    seed: int = 0
    register_as: str | None = None


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
    sampler = optuna.samplers.TPESampler(seed=seed)
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
            return optuna.create_study(study_name=cfg.study_name, storage=storage, direction="minimize",
                                       sampler=sampler, pruner=pruner, load_if_exists=True)
        except Exception as exc:  # sqlalchemy / driver errors: an unreachable or malformed URL, or that race
            last_error = exc
            time.sleep(0.5 + attempt)
    reason = (str(last_error).strip().splitlines() or [type(last_error).__name__])[0]
    raise BinCounterError(tracking.redact_uri(f"cannot open Optuna storage {cfg.storage!r}: {reason}"))


def objective_for(cfg: TuneConfig, parent_run_id: str):
    def objective(trial: optuna.Trial) -> float:
        # Trial numbers are handed out atomically by the storage, so workers agree on who came first.
        study = trial.study
        earlier = [t for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                   if t.number < trial.number]
        if len(earlier) >= cfg.n_trials:
            study.stop()
            raise BudgetReached(f"trial {trial.number} not run: the study already has {cfg.n_trials} trials")
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
            result = train(trial_cfg, on_epoch=report, save_model=False, parent_run_id=parent_run_id)
        except optuna.TrialPruned:
            client = mlflow.MlflowClient()
            client.set_tag(run_ids[-1], "trial_state", "PRUNED")
            client.set_terminated(run_ids[-1], "KILLED")
            raise
        mlflow.MlflowClient().set_tag(result.run_id, "trial_state", "COMPLETE")
        return float(result.history["val_loss"].min())

    return objective


def log_study_plots(study: optuna.Study) -> None:
    import warnings

    from optuna.visualization import matplotlib as ov

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    tracking.log_figure(ov.plot_optimization_history(study).figure, "optimization_history.png")
    if len([t for t in study.trials if t.state == TrialState.COMPLETE]) >= 2:
        try:
            tracking.log_figure(ov.plot_param_importances(study).figure, "param_importances.png")
        except (RuntimeError, ValueError) as exc:  # all trials alike: importance undefined
            log.info("no parameter-importance plot: %s", exc)
    tracking.log_frame(study.trials_dataframe(attrs=("number", "value", "params", "state")), "trials")


def study_params(cfg: TuneConfig) -> dict:
    """The parent run's params; the storage URL without its password (a param is readable by anyone with the run)."""
    return {"n_trials": cfg.n_trials, "backbone": cfg.base.backbone, "study_name": cfg.study_name,
            "storage": tracking.redact_uri(cfg.storage) if cfg.storage else "in-memory",
            **{f"space_{k}": f"{v[0]}-{v[1]}" for k, v in dataclasses.asdict(cfg.space).items()}}


def tune(cfg: TuneConfig) -> dict:
    """`bin-counter tune --backend local`: search, then train the best configuration and evaluate it on test."""
    cfg.space.validate()
    backbone_spec(cfg.base.backbone)  # unknown names fail before any work
    if cfg.base.head != "sgd":
        raise BinCounterError("tune searches the SGD head's batch size, lr and epochs; the logistic head chooses its "
                              "own strength by cross-validation: use --head sgd")
    if cfg.n_trials < 1:
        raise BinCounterError("--n-trials must be >= 1")
    refuse_password_in(cfg.storage)
    study = open_study(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tracking.run("tune", study=cfg.study_name) as parent:
        tracking.log_params(study_params(cfg))
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        if done:
            log.info("resuming study %r: %d of %d trials already finished", cfg.study_name, done, cfg.n_trials)
        # N trials in all, not N per worker: MaxTrialsCallback stops a worker once N have finished anywhere, and
        # the objective refuses a trial that a concurrent worker's started trials already make one too many.
        try:
            study.optimize(objective_for(cfg, parent.info.run_id), n_trials=max(cfg.n_trials - done, 0),
                           n_jobs=cfg.n_jobs, callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=FINISHED)],
                           catch=(BudgetReached,))
        except Exception as exc:
            if not _lost_connection(exc):
                raise
            reason = (str(exc.__cause__ or exc).strip().splitlines() or ["?"])[0]
            raise BinCounterError(tracking.redact_uri(
                f"lost the Optuna storage {cfg.storage} for over {STORAGE_RETRY_SECONDS} s ({reason}); rerun the same "
                "command to resume the study")) from None
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise BinCounterError("no trial completed; widen the search space or add trials")
        best = study.best_trial
        print(f"best trial {best.number}: Average loss: {best.value:.4f} with {best.params}")
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.log_metrics({"best_value": best.value, "trials_complete": len(complete),
                            "trials_pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))})
        log_study_plots(study)

        # As the study did: train the best configuration and evaluate it on the test split.
        best_cfg = dataclasses.replace(cfg.base, **best.params, run_name="best", register_as=cfg.register_as)
        result = train(best_cfg)
        report = evaluate_into_run(result.run_id, result.model_uri, best_cfg.data)
        mlflow.log_metrics({f"best_test_{k}": report.metrics[k] for k in ("accuracy", "f1_macro", "mae")})
        mlflow.set_tag("best_model_uri", result.model_uri)
        print(f"best configuration on test: {summary_lines(report.metrics)}")
        print(f"run_id: {parent.info.run_id}")
    return {"best_params": best.params, "best_value": best.value, "model_uri": result.model_uri,
            "test": report.metrics, "parent_run_id": parent.info.run_id}


