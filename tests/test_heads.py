"""The logistic head reaches the convex optimum, survives export into the study's head, and the ordinal decoding
does what its formula says."""
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from bin_counter.commands.train import train
from bin_counter.config import RECIPES, TrainConfig
from bin_counter.core.heads import fit_logistic, fit_multinomial
from bin_counter.core.metrics import decode
from bin_counter.core.models import classifier_head
from bin_counter.pyfunc import encode_image

CLASSES = [1, 2, 3, 4, 5]


def synthetic(n=240, d=12, k=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    logits = x @ rng.normal(size=(d, k)) + rng.normal(scale=2.0, size=(n, k))
    return x, logits.argmax(1)


@pytest.mark.parametrize("c", [0.01, 0.3, 3.0])
def test_fit_multinomial_reaches_sklearns_optimum(c):
    x, y = synthetic()
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y).predict_proba(x)
    weight, bias = fit_multinomial(torch.tensor(x), torch.tensor(y), 4, c)
    ours = torch.softmax(torch.tensor(x, dtype=torch.float32) @ weight.T + bias, 1).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-3)


def test_balanced_fit_matches_sklearns_class_weight_balanced():
    x, y = synthetic(seed=1)
    keep = (y != 0) | (np.arange(len(y)) % 4 == 0)  # make class 0 rare
    x, y = x[keep], y[keep]
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10_000, class_weight="balanced").fit(x, y)
    from bin_counter.core.heads import balanced_weights

    labels = torch.tensor(y)
    weight, bias = fit_multinomial(torch.tensor(x), labels, 4, 0.1, balanced_weights(labels, 4))
    ours = torch.softmax(torch.tensor(x, dtype=torch.float32) @ weight.T + bias, 1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(x), atol=1e-3)


def test_cv_choice_is_refitted_on_all_images_and_exports_exactly():
    x, y = synthetic(n=150, d=8, k=3, seed=2)
    views = torch.tensor(np.stack([x, x + 0.1, x - 0.1, 1.1 * x], 1), dtype=torch.float32)  # (N, 4 views, D)
    fitted = fit_logistic(views, torch.tensor(y), 3, c_grid=(0.01, 0.1, 1.0), folds=3)
    assert fitted.c == min(fitted.cv_log_loss, key=fitted.cv_log_loss.get)
    assert fitted.oof_probs.shape == (150, 3) and np.allclose(fitted.oof_probs.sum(1), 1, atol=1e-5)
    # the final head is the optimum on every view of every image at the chosen C, scaled by the folds' share of
    # the images (2/3 with 3 folds), so its data weighs against the penalty as in the folds it was chosen on
    assert fitted.refit_c == pytest.approx(fitted.c * 100 / 150)
    standardised = fitted.scaler(views).reshape(-1, 8)
    weight, bias = fit_multinomial(standardised, torch.tensor(y).repeat_interleave(4), 3, fitted.refit_c)
    np.testing.assert_allclose(fitted.weight.numpy(), weight.numpy(), atol=1e-3)
    # written into the study's head (BatchNorm, Dropout, Linear) it gives the same probabilities on raw features
    head = classifier_head(8, 3)
    fitted.write_into(head)
    with torch.no_grad():
        exported = torch.softmax(head(views.reshape(-1, 8)), 1).view(150, 4, 3).mean(1).numpy()
    np.testing.assert_allclose(exported, fitted.probabilities(views), atol=1e-5)


def test_ordinal_decoding_charges_for_distance_and_keeps_the_end_counts():
    probs = np.array([[0.40, 0.0, 0.0, 0.30, 0.30],  # argmax 1; far from most of the mass
                      [0.45, 0.40, 0.15, 0.0, 0.0]])
    assert decode(probs, CLASSES, "argmax").tolist() == [1, 1]
    assert decode(probs, CLASSES, "ordinal", cost=0.0).tolist() == [1, 1]  # no distance cost: argmax
    # row 1: answering 4 costs .4 * (1 + 3) + .3 * (1 + 1) = 2.2, answering 1 costs .3 * 4 + .3 * 5 = 2.7
    # row 2: answering 2 costs .45 * 2 + .15 * 2 = 1.2, answering 1 costs .4 * 2 + .15 * 3 = 1.25
    assert decode(probs, CLASSES, "ordinal", cost=1.0).tolist() == [4, 2]
    # raising the end counts' odds by exp(0.5) gives row 2's near tie back to the end count
    assert decode(probs, CLASSES, "ordinal", cost=1.0, tail_boost=0.5).tolist() == [4, 1]


def test_recipes_keep_the_study_exact_and_the_default_is_counting():
    assert RECIPES["study"] == dict(head="sgd", loss="ce", decode="argmax", balance=False, tta=False, hflip=False,
                                    rotation_degrees=30.0, image_size=224, unfreeze_last=0, lr=1e-3, epochs=5)
    default = TrainConfig()
    assert all(getattr(default, key) == value for key, value in RECIPES["counting"].items())


def test_logistic_head_refuses_what_it_cannot_do():
    from bin_counter import BinCounterError

    for bad in (dict(unfreeze_last=2), dict(stream=True, data="s3://b/p")):
        with pytest.raises(BinCounterError, match="--head sgd"):
            TrainConfig(**bad).validate()


@pytest.mark.slow
def test_served_model_gives_the_probabilities_training_measured(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), num_workers=0, image_size=224, cache_dir=str(tmp_path / "cache"))
    result = train(cfg)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.metrics["train/head_c"] > 0 and run.data.params["head"] == "logistic"
    measured = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                               artifact_path="test_predictions.csv"),
                           dtype={"image_id": str})
    config = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/model/artifacts/config.json")
    assert config["decoding"] == {"how": "ordinal", "cost": cfg.decode_cost, "tail_boost": cfg.decode_tail_boost}
    paths = {p.stem: p for p in (Path(tiny_data) / "images").iterdir()}
    images = [encode_image(paths[i]) for i in measured["image_id"]]
    # a fresh process with stock MLflow loads the logged model and answers the same probabilities
    code = ("import json,sys,mlflow,pandas as pd; m=mlflow.pyfunc.load_model(sys.argv[1]);"
            "print(m.predict(pd.DataFrame({'image': json.load(open(sys.argv[2]))})).to_json(orient='records'))")
    (tmp_path / "images.json").write_text(json.dumps(images))
    proc = subprocess.run([sys.executable, "-c", code, result.model_uri, str(tmp_path / "images.json")],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    served = pd.DataFrame(json.loads(proc.stdout.strip().splitlines()[-1]))
    columns = [f"prob_{c}" for c in CLASSES]
    # training used float16-cached features; the served model runs the backbone in float32
    np.testing.assert_allclose(served[columns].to_numpy(), measured[columns].to_numpy(), atol=5e-3)
    expected_counts = decode(measured[columns].to_numpy(), CLASSES, **config["decoding"])
    assert (served["predicted_count"].to_numpy() == expected_counts).mean() >= 0.9


def test_few_images_of_a_count_still_fit_with_fewer_folds_or_a_fixed_strength():
    x, y = synthetic(n=40, d=6, k=3, seed=3)
    y[:3], y[3:] = 0, np.where(y[3:] == 0, 1, y[3:])  # count 0 has exactly 3 images: 3 folds at most
    views = torch.tensor(x, dtype=torch.float32)[:, None]
    assert fit_logistic(views, torch.tensor(y), 3, c_grid=(0.01, 0.1)).cv_log_loss  # cross-validated, 3 folds
    y[1:3] = 1  # now a single image of count 0: no fold can hold it out and keep it in training
    fitted = fit_logistic(views, torch.tensor(y), 3, c_grid=(0.01, 0.1))
    assert fitted.cv_log_loss == {} and fitted.oof_probs.shape == (40, 3)


def test_one_table_names_each_head_for_validation_and_dispatch():
    """core.choices.HEADS is what TrainConfig.validate accepts and what train dispatches on: every head's fit
    functions exist in the loop, and a name outside the table is refused with the table's names."""
    from bin_counter import BinCounterError
    from bin_counter.core.choices import HEADS, LOSSES
    from bin_counter.core.training import fit, head_fitter, profiled_solve, solve_head

    assert (head_fitter("sgd"), head_fitter("logistic"), head_fitter("logistic", profiled=True)) == \
        (fit, solve_head, profiled_solve)
    assert all(callable(head_fitter(name, profiled)) for name in HEADS for profiled in (False, True))
    for option, table in (("head", HEADS), ("loss", LOSSES)):
        with pytest.raises(BinCounterError, match=re.escape(f"{option} must be {' or '.join(table)}")):
            TrainConfig(**{option: "nope"}).validate()
    with pytest.raises(BinCounterError, match="the logistic head is solved on frozen features"):
        TrainConfig(head="logistic", unfreeze_last=1).validate()
    assert "lr" not in TrainConfig(head="logistic").result_settings()
    assert "lr" in TrainConfig(head="sgd").result_settings()
