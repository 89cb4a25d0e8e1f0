"""Every recipe switch on tiny data: decoding, the ordinal loss, class balancing, test-time augmentation, the
per-image feature cache, recipes on the command line, and the cross-validation protocol."""
import dataclasses

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bin_counter.cli import parse, train_config
from bin_counter.commands.evaluate import evaluate_model
from bin_counter.commands.train import train
from bin_counter.config import RECIPES, CrossvalConfig, TrainConfig
from bin_counter.core.data import dihedral_views, eval_transform
from bin_counter.core.features import FeatureViews, cached_features
from bin_counter.core.losses import CountingLoss, make_criterion
from bin_counter.core.manifest import read_manifest
from bin_counter.core.metrics import decode
from bin_counter.core.models import create_model
from bin_counter.core.training import evaluate_epoch
from bin_counter.pyfunc import load_model


def test_decode_argmax_and_expected():
    probs = np.array([[0.5, 0.0, 0.0, 0.0, 0.5], [0.1, 0.6, 0.3, 0.0, 0.0]])
    assert decode(probs, [1, 2, 3, 4, 5]).tolist() == [1, 2]
    assert decode(probs, [1, 2, 3, 4, 5], "expected").tolist() == [3, 2]  # E = 3.0 and 2.2


def test_counting_loss_knows_counts_are_ordered():
    loss = CountingLoss([1, 2, 3, 4, 5], expected_weight=1.0)
    target = torch.tensor([0])
    near = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]], requires_grad=True)  # says 2 for a true 1
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]])  # says 5 for a true 1
    plain = CountingLoss([1, 2, 3, 4, 5])
    assert (loss(far, target) - loss(near, target)) > (plain(far, target) - plain(near, target))
    loss(near, target).backward()
    assert near.grad is not None and torch.isfinite(near.grad).all()


def test_balance_weights_inverse_frequency():
    cfg = TrainConfig(balance=True)
    criterion = make_criterion(cfg, [1, 2, 3], [1, 1, 1, 2, 3, 3])
    weights = criterion.class_weights
    # the solved head's weighting (heads.class_weights): a mean of 1 over the training samples
    per_sample = weights[torch.tensor([0, 0, 0, 1, 2, 2])]
    assert weights[1] > weights[2] > weights[0] and per_sample.mean().item() == pytest.approx(1.0)
    assert make_criterion(TrainConfig(balance=False), [1, 2, 3], [1, 2]).class_weights is None


def test_tta_averages_the_flips_and_transpose():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).eval()
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    loader = [(images, labels, torch.arange(4))]
    out = evaluate_epoch(net, CountingLoss([1, 2, 3, 4, 5]), loader, torch.device("cpu"), tta=True)
    with torch.no_grad():
        manual = torch.stack([net(v).softmax(1) for v in dihedral_views(images)]).mean(0)
    np.testing.assert_allclose(out["probs"], manual.numpy(), rtol=1e-5)
    plain = evaluate_epoch(net, CountingLoss([1, 2, 3, 4, 5]), loader, torch.device("cpu"))
    assert not np.allclose(plain["probs"], out["probs"])


def test_feature_cache_is_per_image_and_batch_independent(tiny_data, tmp_path):
    frame = read_manifest(tiny_data, "train")
    model = create_model("efficientnet-lite0", 5)
    tf = eval_transform("efficientnet-lite0")
    from bin_counter.core.data import train_transform

    rot = train_transform("efficientnet-lite0", rotation=180)
    common = dict(views=2, description={"d": 1}, cache_dir=tmp_path, num_workers=0, seed=0,
                  device=torch.device("cpu"), desc="train")
    first, _ = cached_features(model, frame.head(8), [1, 2, 3, 4, 5], rot, batch_size=4, **common)
    # a larger set, another batch size: the 8 known images come from the cache, the rest are computed
    more, ok = cached_features(model, frame.head(16), [1, 2, 3, 4, 5], rot, batch_size=3, **common)
    assert torch.equal(more[:8], first) and ok.all()
    fresh, _ = cached_features(model, frame.head(16).iloc[::-1], [1, 2, 3, 4, 5], rot, batch_size=5,
                               **{**common, "cache_dir": tmp_path / "other"})
    assert torch.allclose(fresh.flip(0), more, atol=1e-2)  # same views whatever the batch or order
    tta, _ = cached_features(model, frame.head(4), [1, 2, 3, 4, 5], tf, batch_size=4, tta=True, **common)
    assert tta.shape[1] == 4 and FeatureViews(tta, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                                              random_view=False, all_views=True)[0][0].shape == (4, 1280)


def test_recipe_flag_sets_switches_and_explicit_flags_win(capsys):
    from bin_counter.cli import main

    args = train_config(parse(["train", "--recipe", "counting", "--epochs", "2"]))
    assert args.tta and args.balance and args.loss == "ce+expected" and args.epochs == 2
    study = train_config(parse(["train", "--recipe", "study"]))
    assert not study.tta and study.loss == "ce" and study.rotation_degrees == 30
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--recipe", "nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: unknown recipe 'nope'; choose from study, probe")


@pytest.mark.slow
def test_counting_recipe_end_to_end_serves_what_it_measured(tiny_data, tmp_path):
    cfg = dataclasses.replace(TrainConfig(data=str(tiny_data), batch_size=8, feature_views=2, num_workers=0,
                                          cache_dir=str(tmp_path / "cache")), **{**RECIPES["counting-mae"],
                                                                                 "epochs": 3})
    result = train(cfg)
    config = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/model/artifacts/config.json")
    assert config["tta"] is True and config["decoding"]["how"] == "expected"
    report = evaluate_model(load_model(result.model_uri), read_manifest(tiny_data, "test"), [1, 2, 3, 4, 5])
    # the served model decodes and averages views as training's evaluation did (float16 cache: 1 image may flip)
    assert abs(report.metrics["accuracy"] - result.test_metrics["accuracy"]) <= 1 / 12 + 1e-9


@pytest.mark.slow
def test_crossval_protocol_writes_the_table(tmp_path):
    from bin_counter.commands.crossval import crossval

    out = tmp_path / "crossval.md"
    base = TrainConfig(feature_views=1, num_workers=0, cache_dir=str(tmp_path / "cache"), batch_size=8)

    from conftest import make_abid_dir

    source = make_abid_dir(tmp_path / "abid", per_class=6)
    table = crossval(CrossvalConfig(source=str(source), recipes=("study", "probe"), folds=3, seed=0, base=base,
                                    output=str(out)))
    assert list(table["recipe"]) == ["majority class", "study", "probe"] and (table["folds"] == 3).all()
    recalls = [float(r) for r in table.set_index("recipe").loc["probe", "recall per count"].split(" / ")]
    assert len(recalls) == 5 and all(0 <= r <= 1 for r in recalls)
    text = out.read_text()
    assert "± " in text and "3-fold" in text
    parent = mlflow.last_active_run()
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                            artifact_path="crossval_folds.csv"))
    assert folds.shape[0] == 9 and (folds.loc[folds["recipe"] != "majority class", "minutes"] > 0).all()



def test_corrupt_feature_cache_file_is_recomputed_not_fatal(tiny_data, tmp_path, caplog):
    frame = read_manifest(tiny_data, "test").head(3)
    model = create_model("efficientnet-lite0", 5)
    common = dict(classes=[1, 2, 3, 4, 5], transform=eval_transform("efficientnet-lite0", 64), views=1,
                  description={"d": 2}, cache_dir=tmp_path, batch_size=4, num_workers=0, seed=0,
                  device=torch.device("cpu"), desc="test")
    first, _ = cached_features(model, frame, **common)
    (stored,) = tmp_path.glob("*.pt")
    stored.write_bytes(stored.read_bytes()[:100])  # a truncated write
    again, ok = cached_features(model, frame, **common)
    assert torch.allclose(again, first) and ok.all() and "deleted" in caplog.text.lower()


@pytest.mark.slow
def test_crossval_repeats_through_the_cli(tmp_path):
    """`crossval --repeats 2`: each repeat is a fresh stratified split of all images, every image tested once per
    repeat, and the table counts folds x repeats."""
    from bin_counter.cli import main
    from conftest import make_abid_dir

    source = make_abid_dir(tmp_path / "abid", per_class=6)
    main(["crossval", "--source", str(source), "--recipes", "probe", "--folds", "2", "--repeats", "2",
          "--feature-views", "1", "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"),
          "--output", str(tmp_path / "crossval.md")])
    assert "2-fold cross-validation (2 repeat(s)" in (tmp_path / "crossval.md").read_text()
    parent = mlflow.last_active_run()
    assert parent.data.params["repeats"] == "2" and parent.data.params["folds"] == "2"
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                            artifact_path="crossval_folds.csv"))
    assert sorted(folds.loc[folds["recipe"] == "probe", "fold"]) == [0, 1, 2, 3]
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f"probe-fold{i}" for i in range(4)]
    tested = []
    for i in range(4):
        (manifest,) = (tmp_path / ".cache" / "crossval").glob(f"*/fold-{i}/manifest.csv")
        frame = pd.read_csv(manifest, dtype={"image_id": str})
        tested.append(set(frame.loc[frame["split"] == "test", "image_id"]))
    everything = set(frame["image_id"])
    assert len(everything) == 30
    for first, second in ((0, 1), (2, 3)):  # within a repeat the test folds partition the images
        assert tested[first] | tested[second] == everything and not tested[first] & tested[second]
    assert tested[0] != tested[2]  # the second repeat is another split
