"""Importing bin_counter changes nothing global, and reading an image leaves the caller's random stream alone."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bin_counter.core.data import ManifestImages, train_transform
from bin_counter.core.manifest import read_manifest

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys, warnings
import PIL.Image, torch
# third-party libraries add their own warning filters when imported; only ours are under test
import mlflow.pyfunc, mlflow.sagemaker, optuna, sklearn.model_selection, matplotlib.figure, onnxruntime, torchvision
import bin_counter
pixels, filters, threads = PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters), torch.get_num_threads()
state = torch.random.get_rng_state()
for module in pkgutil.walk_packages(bin_counter.__path__, "bin_counter."):
    if module.name not in ("bin_counter.__main__", "bin_counter.serving.served"):  # entry points: run when imported
        importlib.import_module(module.name)
changed = [name for name, same in (
    ("PIL.Image.MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS == pixels),
    ("warning filters", warnings.filters == filters),
    ("torch threads", torch.get_num_threads() == threads),
    ("torch random state", torch.equal(torch.random.get_rng_state(), state)),
    ("matplotlib.pyplot imported", "matplotlib.pyplot" not in sys.modules),
) if not same]
print(changed)
"""


@pytest.mark.slow  # > 5 s: a fresh interpreter or network timeouts
def test_importing_every_module_changes_no_global_state():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_seeded_views_do_not_reseed_the_callers_generator(tiny_data):
    dataset = ManifestImages(read_manifest(tiny_data, "val").head(2), [1, 2, 3, 4, 5],
                             train_transform("efficientnet-lite0", 64), view_seed=7)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = dataset[0][0]
    assert torch.equal(torch.rand(3), expected)  # the stream continues as if no image had been read
    assert torch.equal(dataset[0][0], first)  # and the view itself is still the seeded one
