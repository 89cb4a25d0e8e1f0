"""The commands as the README gives them, checked without training: every command's help, what a recipe or a
study definition resolves to, promote's rule for lower-is-better metrics, `predict --endpoint` against a SageMaker
endpoint and `prepare --upload` to S3 (both on the moto server)."""
import base64
import json
import re
from pathlib import Path

import boto3
import pandas as pd
import pytest
import requests
import yaml

from bin_counter.cli import build_commands, main, parse, train_config
from bin_counter.config import RECIPES
from bin_counter.core.dataset import SAMPLE_DIR
from bin_counter.core.manifest import read_manifest
from conftest import LoopbackProxy

ROOT = Path(__file__).resolve().parents[1]
STUDY_YAML = ROOT / "experiments/studies/efficientnet_vs_resnet50/efficientnet_vs_resnet50.yaml"


def commands() -> dict:
    return build_commands()[1]


def test_every_command_has_help(capsys):
    names = set(commands())
    # the README's table of commands: `name` | what it does | `--options`
    readme_table = set(re.findall(r"^\| `([a-z]+)` \|[^|]*\| `--", (ROOT / "README.md").read_text(), re.MULTILINE))
    assert readme_table and readme_table <= names, readme_table - names  # the README's commands all exist
    assert len(names) >= 11
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    overview = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name in names:
        assert re.search(rf"^\s+{name}\s+\S", overview, re.MULTILINE), f"{name} has no line in bin-counter --help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith(f"usage: bin-counter {name}"), name
        options = [o for a in commands()[name]._actions for o in a.option_strings if o not in ("-h", "--help")]
        assert all(o in out for o in options), name  # every option is listed


def test_finetune_recipe_fine_tunes_the_last_stages_with_their_own_learning_rate():
    import torch

    from bin_counter.core.models import create_model, freeze
    from bin_counter.core.training import make_optimizer

    cfg = train_config(parse(["train", "--recipe", "finetune"]))
    assert {k: getattr(cfg, k) for k in RECIPES["finetune"]} == RECIPES["finetune"]
    assert (cfg.unfreeze_last, cfg.image_size, cfg.head) == (3, 320, "sgd")
    assert train_config(parse(["train", "--recipe", "finetune", "--unfreeze-last", "1"])).unfreeze_last == 1
    model = create_model(cfg.backbone, 5)
    freeze(model, cfg.unfreeze_last)
    stages = model.backbone.stages()
    assert all(p.requires_grad for s in stages[-3:] for p in s.parameters())
    assert not any(p.requires_grad for s in stages[:-3] for p in s.parameters())
    groups = make_optimizer(cfg, model, model).param_groups
    assert [g["lr"] for g in groups] == [cfg.lr, cfg.backbone_lr] == [1e-3, 2e-4]
    in_backbone = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in in_backbone for p in groups[1]["params"]) and isinstance(groups[1]["params"][0], torch.Tensor)


def test_compare_experiment_yaml_supplies_defaults_that_flags_override(tmp_path, capsys):
    study = yaml.safe_load(STUDY_YAML.read_text())
    args = parse(["compare", "--experiment", str(STUDY_YAML)])
    assert args.backbones == study["backbones"] and train_config(args).epochs == study["epochs"] == 5
    flagged = parse(["compare", "--experiment", str(STUDY_YAML), "--epochs", "2", "--backbones", "resnet18"])
    assert flagged.epochs == 2 and flagged.backbones == "resnet18" and flagged.lr == study["lr"]
    # a list in YAML is the comma-separated option
    listed = tmp_path / "listed.yaml"
    listed.write_text(yaml.safe_dump({"backbones": ["efficientnet-lite0", "resnet18"], "epochs": 3}))
    assert parse(["compare", "--experiment", str(listed)]).backbones == "efficientnet-lite0,resnet18"
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--experiment", str(typo)])
    assert exit_info.value.code == 2 and "unknown keys ['epochz']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--experiment", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "settings file not found" in capsys.readouterr().err


@pytest.mark.parametrize("metric, candidate, champion, gain, better", [
    ("f1_macro", 0.60, 0.50, 0.05, True),
    ("f1_macro", 0.54, 0.50, 0.05, False),
    ("mae", 0.40, 0.50, 0.05, True),  # lower is better: 0.1 fewer counts off
    ("mae", 0.60, 0.50, 0.05, False),  # a higher MAE never wins with a positive margin
    ("rmse", 0.90, 1.00, 0.0, True),
    ("accuracy", 0.90, 1.00, 0.0, False),
])
def test_promote_rule_knows_which_metrics_are_lower_is_better(metric, candidate, champion, gain, better):
    from bin_counter.commands.registry import is_better

    assert is_better(candidate, champion, metric, gain) is better


@pytest.fixture
def endpoint(aws, moto_endpoint, monkeypatch):
    """SageMaker runtime on moto, seen through a proxy that records what `predict` sends."""
    sent = []

    def record(handler, body):
        if "/invocations" in handler.path:
            sent.append((handler.path, handler.headers.get("Content-Type"), body))

    proxy = LoopbackProxy(moto_endpoint, record)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield moto_endpoint, sent
    proxy.close()


def queue_answers(moto_endpoint: str, *bodies: dict) -> None:
    """What moto's SageMaker runtime answers, in order (its documented test hook)."""
    results = [{"Body": json.dumps(b), "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic",
                "CustomAttributes": ""} for b in bodies]
    requests.post(f"{moto_endpoint}/moto-api/static/sagemaker/endpoint-results",
                  json={"region": "us-east-1", "results": results}, timeout=30).raise_for_status()


def test_predict_endpoint_sends_the_images_and_writes_the_answers(endpoint, tmp_path):
    moto_endpoint, sent = endpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    images = sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))[:3]
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    answer = {"predictions": [{"predicted_count": c, "confidence": p, "uncertainty": u, "count_set": s, "error": ""}
                              for c, p, u, s in ((2, 0.9, 0.3, "2"), (4, 0.3, 1.5, "3|4|5"), (1, 0.8, 0.6, "1|2"))]}
    queue_answers(moto_endpoint, answer)
    main(["predict", "--endpoint", "bins", "--region", "us-east-1", "--input", str(folder),
          "--output", str(tmp_path / "results.csv"), "--check-share", "0.3"])
    (path, content_type, body) = sent[0]
    assert len(sent) == 1 and path == "/endpoints/bins/invocations" and content_type == "application/json"
    rows = json.loads(body)["dataframe_split"]["data"]
    assert [base64.b64decode(r[0]) for r in rows] == [p.read_bytes() for p in images]  # the files, in order
    written = pd.read_csv(tmp_path / "results.csv", dtype={"image_id": str}).set_index("image_id")
    assert list(written.loc[[p.stem for p in images], "predicted_count"]) == [2, 4, 1]
    check = pd.read_csv(tmp_path / "results_manual_check.csv", dtype={"image_id": str})
    # no records: the 30% least certain of three bins is one, the one of highest uncertainty
    assert list(check["image_id"]) == [images[1].stem] and check["check_reason"][0] == "least certain, no record"
    assert written.loc[images[1].stem, "count_set"] == "3|4|5"


def test_predict_endpoint_answer_that_does_not_fit_marks_the_images(endpoint, tmp_path):
    moto_endpoint, _ = endpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((SAMPLE_DIR / "bin-images").glob("*.jpg"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    queue_answers(moto_endpoint, {"predictions": [{"predicted_count": 1, "confidence": 0.9, "error": ""}]})
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--endpoint", "bins", "--region", "us-east-1", "--input", str(folder),
              "--output", str(tmp_path / "results.csv")])
    assert exit_info.value.code == 2  # no image was counted
    written = pd.read_csv(tmp_path / "results.csv")
    assert len(written) == 2 and written["error"].str.contains("1 predictions for 2 images").all()


def test_prepare_upload_through_the_cli(aws, tmp_path):
    aws.create_bucket(Bucket="mine")
    main(["prepare", "--out", str(tmp_path / "data"), "--limit-per-class", "2", "--workers", "2",
          "--upload", "s3://mine/abid/v1", "--shard-size", "4"])
    manifest = read_manifest(tmp_path / "data")
    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="mine", Prefix="abid/v1/")["Contents"]}
    assert {"abid/v1/manifest.csv", "abid/v1/rejected.csv", "abid/v1/dataset.json",
            "abid/v1/shards/index.json"} <= keys
    assert {f"abid/v1/{p}" for p in manifest["path"]} <= keys and len(manifest) == 10
    body = aws.get_object(Bucket="mine", Key=f"abid/v1/{manifest['path'].iloc[0]}")["Body"].read()
    assert body == (tmp_path / "data" / manifest["path"].iloc[0]).read_bytes()
    # what train --data s3://... --stream and SageMaker's training channel read back
    uploaded = boto3.client("s3", region_name="us-east-1").get_object(Bucket="mine", Key="abid/v1/manifest.csv")
    assert uploaded["Body"].read() == (tmp_path / "data" / "manifest.csv").read_bytes()


@pytest.mark.parametrize("command", [["predict", "--model-uri", "runs:/x/model", "--input", "."],
                                     ["transform", "--join", "s3://bins/transform/job"]])
def test_min_confidence_is_gone_with_a_line_naming_its_replacement(command, capsys):
    """--min-confidence put 96% of bins on the manual-check list; records are now questioned by --false-alarm and
    bins without one by --check-share, and the old option says so in one line."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--min-confidence", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --min-confidence is gone")
    assert "--false-alarm" in err[0] and "--check-share" in err[0]


def test_records_file_errors_are_one_line(tmp_path, capsys):
    records = tmp_path / "records.csv"
    records.write_text("image_id,quantity\n00001,3\n")
    for content, message in (("image_id,quantity\n00001,3\n", "needs an expected_quantity column"),
                             ("image_id,expected_quantity\n00001,three\n", "line 2: expected_quantity is not a "
                                                                             "number")):
        records.write_text(content)
        with pytest.raises(SystemExit):
            main(["predict", "--model-uri", "runs:/x/model", "--input", str(tmp_path), "--records", str(records)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
