import pytest
import torch

from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.model import create_backbone


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_logits_and_features_from_one_pass(name):
    torch.manual_seed(0)
    bb = create_backbone(name, in_chans=3).eval()
    x = torch.randn(4, 3, 32, 32) if name == "test_resnet" else torch.randn(4, 3, 160, 160)
    out = bb(x)
    assert out.logits.shape == (4,)
    assert out.features.shape == (4, bb.feature_dim)
    # the logit is exactly the linear head applied to the returned features
    head = bb.net.get_classifier()
    assert torch.allclose(out.logits, head(out.features).squeeze(-1))
    assert torch.allclose(out.logits, bb.net(x).squeeze(-1), atol=1e-5)


def test_input_channels_come_from_the_caller():
    bb = create_backbone("test_resnet", in_chans=1)
    assert bb(torch.randn(2, 1, 32, 32)).logits.shape == (2,)


def test_pretrained_file_with_another_head_and_channels_is_adapted(tmp_path):
    import timm

    imagenet_like = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "imagenet_like.pth"
    torch.save({"state_dict": imagenet_like.state_dict()}, path)
    gray = create_backbone("test_resnet", in_chans=1, pretrained_file=path)
    conv = imagenet_like.state_dict()["conv1.0.weight"]
    assert torch.allclose(gray.net.state_dict()["conv1.0.weight"], conv.sum(dim=1, keepdim=True))
    assert gray.net.get_classifier().out_features == 1


def test_pretrained_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(FairbenchError, match=r"notes\.txt: not a readable checkpoint"):
        create_backbone("test_resnet", in_chans=3, pretrained_file=path)


def test_pretrained_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = create_backbone("test_resnet", in_chans=3)
    path = tmp_path / "weights.pth"
    torch.save(source.net.state_dict(), path)
    torch.manual_seed(2)
    loaded = create_backbone("test_resnet", in_chans=3, pretrained_file=path)
    fresh = create_backbone("test_resnet", in_chans=3)
    key = "conv1.0.weight"
    assert torch.equal(loaded.net.state_dict()[key], source.net.state_dict()[key])
    assert not torch.equal(fresh.net.state_dict()[key], source.net.state_dict()[key])


def test_pretrained_file_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(create_backbone("test_vit", in_chans=3).net.state_dict(), path)
    with pytest.raises(FairbenchError, match=r"vit.pth does not fit 'test_resnet': \d+ missing keys"):
        create_backbone("test_resnet", in_chans=3, pretrained_file=path)
    with pytest.raises(FairbenchError, match="no such file"):
        create_backbone("test_resnet", in_chans=3, pretrained_file=tmp_path / "missing.pth")


def test_unknown_backbone_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        create_backbone("resnet_18", in_chans=3)


class _Payload:
    """An object a checkpoint must never unpickle."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pretrained_file_is_read_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    state = create_backbone("test_resnet", in_chans=3).net.state_dict()
    torch.save({**state, "payload": _Payload()}, path)
    with pytest.raises(FairbenchError, match="not a readable checkpoint"):
        create_backbone("test_resnet", in_chans=3, pretrained_file=path)
