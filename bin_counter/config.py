"""Typed configuration with the study's defaults. Every field of a run's config is logged as an MLflow param."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bin_counter import BinCounterError, one_line
from bin_counter.core.choices import ENGINES, HEADS, LOSSES, SPLITS


def setting(default: Any, help: str, **option: Any) -> Any:
    """A config field with its command-line help: the CLI's options are built from these (cli.add_config_options).
    `option`: argparse's `choices` or `metavar`, or a group of options given at most once (`exclusive=NAME`) or
    exactly once (`one_of=NAME`)."""
    return field(default=default, metadata={"help": help, **option})


def setting_from(factory: Callable[[], Any], help: str, **option: Any) -> Any:
    """A setting whose default is found when a config is made: from the environment, or owned by another module."""
    return field(default_factory=factory, metadata={"help": help, **option})


def required(help: str, **option: Any) -> Any:
    """A setting without a default: the option must be given."""
    return setting(dataclasses.MISSING, help, **option)


@dataclass(frozen=True)
class PrepareConfig:
    source: str = setting("sample", "`sample` (bundled), a directory in ABID's layout, or s3://bucket[/prefix] "
                                    "(ABID's public bucket: s3://aft-vbi-pds)")
    out: str = setting("data", "DATA_DIR to write")
    file_list: str | None = setting(None, "the study's file_list.json or a JSON list of ids")
    classes: str = setting("1-5", "counts kept, e.g. 1-5 (the study's), 0-5, 1-10")
    top_bucket: bool = setting(False, "fold counts above the top class into it instead of dropping them")
    split: tuple[float, float, float] = setting((0.8, 0.1, 0.1), "train,val,test ratios")
    seed: int = setting(0, "seeds the split")
    limit_per_class: int | None = setting(None, "keep at most N images per count")
    workers: int = setting(8, "parallel downloads/validations")
    upload: str | None = setting(None, "copy the prepared splits to s3://bucket/prefix")
    anonymous: bool | None = setting(None, "read S3 without credentials (default: only for ABID's public bucket)")
    shard_size: int = setting(0, "also write WebDataset-style tar shards of N images (for `train --stream`)")
    replace: bool = setting(False, "--out holds a dataset of another source: replace it (without this, prepare "
                                   "refuses)")


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting, defined once. The defaults are the `counting` recipe, chosen on
    experiments/studies/recipes_crossval/crossval.md; `--recipe study` restores the reference study's switches,
    `--recipe probe` is the plain logistic-regression baseline (RECIPES below)."""

    data: str = setting("data", "DATA_DIR written by `prepare`, or s3://... with --stream")
    recipe: str = setting("counting", "the named set of switches the other settings start from (RECIPES below); "
                                      "explicit options win")
    backbone: str = setting("efficientnet-lite0", "backbone name")
    weights: str | None = setting(None, "pretrained backbone weights file instead of the library's cache")
    batch_size: int = setting(32, "images (or cached features) per step")
    lr: float = setting(1e-3, "learning rate of the classifier head (sgd head)")
    epochs: int = setting(10, "epochs of the sgd head")
    seed: int = setting(0, "seeds splits of work, views, shuffles and initialisation")
    weight_decay: float = setting(1e-4, "AdamW weight decay (sgd head)")
    image_size: int = setting(320, "square input size in pixels (the study: 224)")
    rotation_degrees: float = setting(180.0, "random rotation of training views; a bin has no up or down "
                                             "(the study: 30)")
    hflip: bool = setting(True, "random horizontal flips of training views")
    unfreeze_last: int = setting(0, "fine-tune the last N backbone stages; 0 = the study's frozen backbone")
    backbone_lr: float = setting(1e-4, "learning rate of unfrozen backbone stages")
    feature_cache: bool = setting(True, "cache the frozen backbone's features (only while it is wholly frozen)")
    feature_views: int = setting(4, "augmented views cached per training image (sgd head)")
    cache_dir: str = setting(".cache/features", "where the feature cache lives")
    num_workers: int = setting(2, "DataLoader worker processes")
    register_as: str | None = setting(None, "register the logged model under this name")
    run_name: str | None = setting(None, "the MLflow run's name")
    profile: bool = setting(False, "profile what training costs, report in the run: the frozen-feature pass and "
                                   "the solve (logistic head), or the first epoch (sgd head)")
    head: str = setting("logistic", "logistic: solved on frozen features with a CV-chosen strength (heads.py); "
                                    "sgd: the study's head trained by AdamW")
    loss: str = setting("ce+expected", "sgd head: ce (the study), or ce+expected: adds |expected - true count|")
    expected_weight: float = setting(0.5, "weight of the expected-count term of ce+expected")
    decode: str = setting("ordinal", "argmax; expected: the count nearest the expected value (lower MAE, "
                                     "middle-heavy); ordinal: the count of least expected cost (metrics.decode)")
    decode_cost: float = setting(2.0, "ordinal: extra cost per count off, on top of a miss")
    decode_tail_boost: float = setting(0.5, "ordinal: log-odds added to the lowest and highest count, so the "
                                            "middle counts do not absorb them")
    balance: bool = setting(True, "weigh every count equally (inverse class frequency of the training split)")
    coverage: float = setting(0.9, "the served count sets' default coverage (conformal, calibrated on held-out "
                                   "images)")
    false_alarm: float = setting(0.05, "the served record check's default share of correct records called suspect")
    tta: bool = setting(True, "average predictions over flips/transposes: a bin has no up or down")
    # 2.4x the fp32 graph's speed, -0.3 points of accuracy and +0.02 MAE on the 5-fold protocol
    # (experiments/studies/inference), 88% of counts identical: a switch, not the default
    int8: bool = setting(False, "log an int8 inference graph calibrated on training images (faster; "
                                "88% of counts identical)")
    # cpu: the ONNX graph on ONNX Runtime, requirements without torch; cuda: eager PyTorch with AMP on a GPU
    serve_device: str = setting("cpu", "what the logged model is served on: cpu (ONNX Runtime, no torch in its "
                                       "requirements) or cuda (PyTorch + AMP, the torch stack in its requirements)")
    stream: bool = setting(False, "stream the WebDataset shards of --data (a DATA_DIR or s3://...) instead of "
                                  "image files; no feature cache")
    checkpoint_dir: str | None = setting("checkpoints", "where every finished epoch is checkpointed (per run)")
    resume: str | None = setting(None, "continue an interrupted run (the newest checkpoint, or RUN_ID's)")

    @classmethod
    def from_recipe(cls, recipe: str | None = None, **explicit: Any) -> TrainConfig:
        """A recipe's switches over the defaults, then what was set explicitly (flags, a config file) over both."""
        if recipe and recipe not in RECIPES:
            raise BinCounterError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        unknown = set(explicit) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BinCounterError(f"unknown training settings: {', '.join(sorted(unknown))}")
        explicit.pop("recipe", None)
        return cls(**{**RECIPES.get(recipe or "", {}), **explicit, "recipe": recipe or DEFAULT_RECIPE})

    def reproducible(self) -> dict[str, Any]:
        """The settings that made a run, as its config.yaml artifact; `train --config` reads it back."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("resume", "register_as", "run_name")}

    def result_settings(self) -> dict[str, Any]:
        """The resolved settings that shape this run's result, as its MLflow params: no paths of caches, worker
        counts or run bookkeeping, no empty values, and no switch of a head or decoding this run does not use."""
        unused = set(RUN_BOOKKEEPING)
        if self.solved_head:
            unused |= SGD_ONLY
        if self.decode != "ordinal":
            unused |= {"decode_cost", "decode_tail_boost"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused and v is not None}

    @property
    def solved_head(self) -> bool:
        """The head is solved on frozen features in one go (core.choices.HEADS), not trained by SGD."""
        return self.head in HEADS and HEADS[self.head].solved

    @property
    def decoding(self) -> dict[str, Any]:
        """metrics.decode's arguments, as the served model stores them."""
        return {"how": self.decode, "cost": self.decode_cost, "tail_boost": self.decode_tail_boost}

    def validate(self) -> None:
        checks = {
            "batch_size must be >= 2 (BatchNorm needs two samples)": self.batch_size >= 2,
            "lr must be > 0": self.lr > 0,
            "epochs must be >= 1": self.epochs >= 1,
            "feature_views must be >= 1": self.feature_views >= 1,
            "coverage must be between 0 and 1": 0 < self.coverage < 1,
            "false_alarm must be between 0 and 1": 0 < self.false_alarm < 1,
            "unfreeze_last must be >= 0": self.unfreeze_last >= 0,
            "an S3 DATA_DIR is read as shards: add --stream": self.stream or not self.data.startswith("s3://"),
            f"loss must be {' or '.join(LOSSES)}": self.loss in LOSSES,
            "decode must be argmax, expected or ordinal": self.decode in DECODES,
            f"head must be {' or '.join(HEADS)}": self.head in HEADS,
            f"the {self.head} head is solved on frozen features: use --head sgd to fine-tune (--unfreeze-last) or "
            "--stream": not self.solved_head or (self.unfreeze_last == 0 and not self.stream),
            "--int8 calibrates on training image files: not with --stream": not (self.int8 and self.stream),
            "serve_device must be cpu or cuda": self.serve_device in ("cpu", "cuda"),
        }
        for message, ok in checks.items():
            if not ok:
                raise BinCounterError(message)


def default_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION", "us-east-1")


# One config per verb: its options, with their defaults and help, defined once (kw_only: callers name the settings)
@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    model_uri: str = required("runs:/RUN_ID/model, models:/NAME@champion, ...")
    data: str = setting(PrepareConfig.out, "DATA_DIR written by `prepare`")
    split: str = setting("test", "the split the model is scored on", choices=SPLITS)
    output: str | None = setting(None, "also write the metrics as JSON to this file")
    batch_size: int = setting(64, "images per batch sent to the model")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    model_uri: str = required("runs:/RUN_ID/model, models:/NAME@champion, a local model folder")
    host: str = setting("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = setting(8080, "the port to listen on")
    workers: int = setting(1, "scoring processes (each loads the model; set BIN_COUNTER_ONNX_THREADS to cores / "
                              "workers)")


@dataclass(frozen=True, kw_only=True)
class PromoteConfig:
    name: str = required("registered model name")
    version: str | None = setting(None, "candidate version (default: the newest)", exclusive="candidate")
    run_id: str | None = setting(None, "candidate: the model of this run (registered if it is not yet)",
                                 exclusive="candidate")
    data: str = setting(PrepareConfig.out, "DATA_DIR whose test split both models are scored on")
    metric: str = setting("f1_macro", "the test-split figure compared: f1_macro, accuracy, mae, rmse, ... "
                                      "(test/f1_macro and the older test_f1_macro say the same)")
    min_gain: float = setting(0.0, "improvement needed to take the champion alias")


@dataclass(frozen=True, kw_only=True)
class ResultsConfig:
    """What predict and transform write beside each count: count sets, the record check, the manual-check list."""

    output: str = setting("results.csv", "the results CSV to write")
    coverage: float | None = setting(None, "count sets hold the true count with this probability (default: the "
                                           "coverage the model was logged with, 0.9)")
    false_alarm: float | None = setting(None, "a recorded quantity is `suspect` when its conformal p-value is below "
                                              "this: the share of correct records questioned (default: the "
                                              "model's, 0.05)")
    records: str | None = setting(None, "recorded quantities to check: columns expected_quantity and image_id or "
                                        "path (path where ids repeat); over ABID metadata beside the photos",
                                  metavar="FILE.csv")
    check_share: float = setting(0.1, "of the bins without a record, the share people can look at: "
                                                      "the least certain go on the manual-check list")


@dataclass(frozen=True, kw_only=True)
class PredictConfig(ResultsConfig):
    model_uri: str | None = setting(None, "runs:/.../model, models:/NAME@champion", one_of="model")
    endpoint: str | None = setting(None, "a SageMaker endpoint name", one_of="model")
    url: str | None = setting(None, "a served model, e.g. http://127.0.0.1:5001", one_of="model")
    input: str = required("a folder, a prepare manifest/DATA_DIR, an image, or s3://bucket/prefix")
    batch_size: int = setting(16, "images per request to the model")
    region: str | None = setting(None, "AWS region of --endpoint")


@dataclass(frozen=True, kw_only=True)
class HostingConfig:
    """The mlflow-pyfunc serving container on SageMaker instances, as deploy and transform run it."""

    model_uri: str | None = setting(None, "models:/NAME@champion, runs:/.../model")
    execution_role_arn: str | None = setting(None, "the role SageMaker runs the model with")
    image_url: str | None = setting(None, "the mlflow-pyfunc serving image (`mlflow sagemaker "
                                          "build-and-push-container`)")
    instance_type: str = setting("ml.m5.large", "SageMaker instance type")
    instance_count: int = setting(1, "SageMaker instances")


@dataclass(frozen=True, kw_only=True)
class DeployConfig(HostingConfig):
    endpoint: str = required("the SageMaker endpoint's name")
    region: str = required("the endpoint's AWS region")
    bucket: str | None = setting(None, "S3 bucket for the model artifacts (default: MLflow's per-region bucket)")
    # the container's environment: workers x threads = the instance's vCPUs (docs/serving-and-deployment.md)
    workers: int = setting(1, "scoring workers per instance (MLflow's container starts one per vCPU otherwise)")
    threads_per_worker: int = setting(0, "ONNX Runtime threads per worker (0: one per physical core)")
    engine: str = setting("onnx", "what runs the model in the container", choices=ENGINES)
    max_image_bytes: int | None = setting(None, "bytes per image the endpoint accepts (default 6 MiB)")
    update: bool = setting(False, "replace the model of an existing endpoint", exclusive="action")
    delete: bool = setting(False, "delete the endpoint", exclusive="action")
    dry_run: bool = setting(False, "print what would be done")


@dataclass(frozen=True, kw_only=True)
class TransformConfig(HostingConfig, ResultsConfig):
    input: str | None = setting(None, "the photos: s3://bucket/prefix (or anything `predict --input` takes)")
    staging: str | None = setting(None, "s3://bucket/prefix for the job's requests, output and index")
    join: str | None = setting(None, "only join an earlier job's output (STAGING/JOB)", metavar="S3_JOB_PREFIX")
    region: str = setting_from(default_region, "AWS region of the job; AWS_DEFAULT_REGION when it is set")
    job_name: str | None = setting(None, "the job's name (default bin-counter-YYYYMMDD-HHMMSS)")
    timeout: int = setting(3600, "seconds to wait for the job")
    dry_run: bool = setting(False, "stage locally and print the request; send nothing")


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """`bin-counter launch`: `train` as a SageMaker training job (its train options are checked apart)."""

    backend: str = setting("sagemaker", "where the training job runs", choices=("sagemaker",))
    s3_data: str | None = setting(None, "s3://bucket/prefix written by `prepare --upload`")
    role: str | None = setting(None, "execution role ARN")
    output_path: str | None = setting(None, "s3:// prefix for the job's outputs (and checkpoints)")
    instance_type: str = setting("ml.g4dn.xlarge", "SageMaker training instance type")
    instance_count: int = setting(1, "more than 1: torchrun across instances (DDP)")
    spot: bool = setting(False, "managed spot training; resumes from checkpoints in S3")
    tracking_secret: str | None = setting(None, "AWS Secrets Manager secret holding the tracking server's "
                                                "credentials as JSON ({\"username\", \"password\"} or {\"token\"}); "
                                                "the job reads it with its role", metavar="SECRET_ID")
    checkpoints: bool = setting(False, "sync checkpoints to S3 without spot")
    image_uri: str | None = setting(None, "training image (default: the region's PyTorch 2.5 GPU image)")
    region: str | None = setting(None, "AWS region (default: AWS_DEFAULT_REGION)")
    dry_run: bool = setting(False, "print the CreateTrainingJob request (the code is staged in S3 so the request "
                                   "is complete)")


@dataclass(frozen=True, kw_only=True)
class CrossvalConfig:
    source: str = setting(PrepareConfig.source, "`sample`, a directory in ABID's layout, or s3://...")
    recipes: tuple[str, ...] = setting(("probe", "study", "counting"), "comma-separated recipe names")
    folds: int = setting(5, "stratified folds")
    repeats: int = setting(1, "repeats of the k-fold split, each a new shuffle")
    seed: int = setting(0, "seeds the folds and each fold's validation split")
    classes: str = setting(PrepareConfig.classes, "counts kept, as prepare's --classes")
    output: str | None = setting(None, "also write the table as markdown "
                                       "(e.g. experiments/studies/recipes_crossval/crossval.md)")
    # every fold's training settings under the recipes' switches (the CLI sets CROSSVAL_TRAINING of them)
    base: TrainConfig = field(default_factory=TrainConfig)


CROSSVAL_TRAINING = ("feature_views", "cache_dir", "num_workers")


DECODES = ("argmax", "expected", "ordinal")
# what `tune --objective` can choose, and which way is better (here, so the CLI's help needs no import of tune)
TUNE_OBJECTIVES = {"accuracy": "maximize", "f1_macro": "maximize", "mae": "minimize"}
DEFAULT_RECIPE = "counting"
# where and how a run works, not what it learns
RUN_BOOKKEEPING = ("cache_dir", "num_workers", "resume", "register_as", "run_name", "checkpoint_dir",
                   "feature_cache")
# what only the SGD head reads: a solved head has no batches, epochs or random training views
SGD_ONLY = {"batch_size", "lr", "epochs", "weight_decay", "loss", "expected_weight", "backbone_lr", "feature_views",
            "rotation_degrees", "hflip", "unfreeze_last"}


def as_params(config: Any) -> dict[str, Any]:
    return {key: ("" if value is None else value) for key, value in dataclasses.asdict(config).items()}


class SettingsLoader(yaml.SafeLoader):
    """safe_load without aliases: a settings file is a few option: value lines, and nested aliases expand
    exponentially (a 415-byte file made a 13.6 MB option)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a settings file",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.load(Path(path).read_text(), Loader=SettingsLoader) or {}  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise BinCounterError(f"settings file not found: {path}") from None
    except (OSError, UnicodeError) as exc:
        raise BinCounterError(f"settings file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise BinCounterError(f"settings file {path} is not valid YAML: {one_line(exc)}") from None
    return doc




# Named recipes: each is a set of TrainConfig switches, applied as defaults that explicit flags override.
# Chosen on experiments/studies/recipes_crossval/crossval.md (5 folds x 2 repeats over the 1,481-image dev sample).
STUDY = dict(head="sgd", loss="ce", decode="argmax", balance=False, tta=False, hflip=False, rotation_degrees=30.0,
             image_size=224, unfreeze_last=0, lr=1e-3, epochs=5)
RECIPES: dict[str, dict[str, Any]] = {
    # the reference study, exactly: frozen backbone, new classifier trained by SGD, cross-entropy, rotation, argmax
    "study": STUDY,
    # the baseline every default must beat: L2 logistic regression on the frozen features of the 4 flips/transposes
    "probe": dict(head="logistic", decode="argmax", balance=False, tta=True, image_size=224, unfreeze_last=0),
    # the default: the probe with every count weighed equally and a decoding that is charged for being far off
    "counting": dict(head="logistic", decode="ordinal", decode_cost=2.0, decode_tail_boost=0.5, balance=True,
                     tta=True, image_size=320, unfreeze_last=0),
    # MAE first: the count nearest the expected value (rarely predicts the end counts)
    "counting-mae": dict(head="logistic", decode="expected", balance=True, tta=True, image_size=320, unfreeze_last=0),
    # the previous default, kept as the SGD-head candidate: ordinal loss term, balancing, any rotation, TTA
    "counting-sgd": dict(head="sgd", loss="ce+expected", decode="argmax", balance=True, tta=True, hflip=True,
                         rotation_degrees=180.0, image_size=224, unfreeze_last=0, lr=1e-3, epochs=10),
    # for a GPU: fine-tune the last stages at a higher resolution with the counting switches
    "finetune": dict(head="sgd", loss="ce+expected", decode="expected", balance=True, tta=True, hflip=True,
                     rotation_degrees=180.0, image_size=320, unfreeze_last=3, lr=1e-3, backbone_lr=2e-4, epochs=12),
}
