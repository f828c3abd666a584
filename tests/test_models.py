"""ResNet heads, conv1 adaptation and offline ImageNet weight loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from biometry.learn import models

torch.set_num_threads(1)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _plant(torch_home, arch: str, fname: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        state = getattr(torchvision.models, arch)(weights=None).state_dict()
    target = torch_home / "hub" / "checkpoints" / fname
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


@pytest.mark.parametrize(("head", "n_out", "width"),
                         [("regression", 3, 3), ("mean_variance", 3, 6), ("classification", 2, 2)])
def test_heads_and_channels(head, n_out, width):
    m = models.build_model("resnet18", in_channels=5, n_outputs=n_out, head=head).eval()
    out = m(torch.rand(2, 5, 32, 32))
    assert out.shape == (2, width)
    assert m.conv1.in_channels == 5
    assert m.biometry == {"arch": "resnet18", "in_channels": 5, "n_outputs": n_out, "head": head}


def test_split_mean_logvar_layout():
    out = torch.arange(12.0).view(2, 6)      # (B, T=3, 2) interleaved as in MIMIR
    mean, logvar = models.split_mean_logvar(out)
    assert mean.tolist() == [[0, 2, 4], [6, 8, 10]]
    assert logvar.tolist() == [[1, 3, 5], [7, 9, 11]]


def test_seeded_init_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = models.build_model("resnet18", 2, 1, seed=5)
    b = models.build_model("resnet18", 2, 1, seed=5)
    c = models.build_model("resnet18", 2, 1, seed=6)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_imagenet_from_planted_cache_with_conv1_adaptation(torch_home):
    state = _plant(torch_home, "resnet18", "resnet18-f37072fd.pth")
    two = models.build_model("resnet18", in_channels=2, n_outputs=1, weights="imagenet")
    assert torch.equal(two.conv1.weight, state["conv1.weight"][:, :2])
    assert torch.equal(two.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(two.bn1.running_var, state["bn1.running_var"])
    assert two.fc.out_features == 1            # the 1000-class fc was dropped
    three = models.build_model("resnet18", in_channels=3, n_outputs=4, weights="imagenet")
    assert torch.equal(three.conv1.weight, state["conv1.weight"])
    many = models.build_model("resnet18", in_channels=6, n_outputs=1, weights="imagenet")
    expect = state["conv1.weight"].mean(1, keepdim=True) * 0.5
    assert torch.allclose(many.conv1.weight, expect.repeat(1, 6, 1, 1))
    # a uniform input activates the adapted conv1 as the RGB filters do a uniform RGB image
    x6, x3 = torch.ones(1, 6, 16, 16), torch.ones(1, 3, 16, 16)
    assert torch.allclose(many.conv1(x6), three.conv1(x3), atol=1e-5)


def test_weights_from_path_and_frozen_backbone(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "my_weights.pth"
    torch.save(state, path)
    m = models.build_model("resnet18", 1, 2, weights=path, freeze_backbone=True)
    assert torch.equal(m.conv1.weight, state["conv1.weight"][:, :1])
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    models.set_train_mode(m, freeze_backbone=True)
    assert m.fc.training and not m.bn1.training and not m.layer1[0].bn1.training


def test_missing_imagenet_file_says_what_to_place_where(torch_home):
    with pytest.raises(FileNotFoundError) as err:
        models.build_model("resnet50", 2, 1, weights="imagenet")
    msg = str(err.value)
    expected = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert str(expected) in msg
    assert "IMAGENET1K_V1" in msg and "python -c" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        models.build_model("resnet18", 2, 1, weights=torch_home / "nope.pth")


def test_wrong_architecture_file_is_rejected(torch_home):
    _plant(torch_home, "resnet18", "resnet50-0676ba61.pth")   # a resnet18 under the 50's name
    with pytest.raises(ValueError, match="not a resnet50 state dict"):
        models.build_model("resnet50", 2, 1, weights="imagenet")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build_model("vgg16", 2, 1)
    with pytest.raises(ValueError, match="unknown head"):
        models.build_model("resnet18", 2, 1, head="ordinal")
