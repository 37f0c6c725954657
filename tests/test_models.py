"""Model factory and pickle-free weights."""

from pathlib import Path

import pytest
import torch

from tasks.models import build_model, input_mode, load_model, save_model
from tasks.preprocess import Preprocess


def test_small_cnn_takes_grayscale_and_outputs_one_logit_per_class():
    model = build_model("smallcnn", num_classes=7, in_channels=1).eval()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_models_come_from_the_library_factory():
    model = build_model("resnet18", num_classes=3).eval()
    assert type(model).__module__.startswith("torchvision.models")
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", num_classes=3)


def test_torchvision_models_are_fed_rgb_even_for_grayscale_data():
    assert input_mode("resnet18", "L") == "RGB"
    assert input_mode("smallcnn", "L") == "L"
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("resnet18", num_classes=3, in_channels=1)


def test_save_and_load_roundtrip_gives_identical_weights_and_outputs_without_pickle(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=4, in_channels=1).eval()
    spec = Preprocess.for_mode("L", 24)
    save_model(tmp_path, model, name="smallcnn", classes=["a", "b", "c", "d"], preprocess=spec)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["model.json", "model.safetensors"]
    loaded, meta = load_model(tmp_path)
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    # loaded for inference in channels_last on CPU (faster convolutions): the same numbers up to float rounding
    conv = next(m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.randn(3, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert meta["classes"] == ["a", "b", "c", "d"]
    assert Preprocess.from_dict(meta["preprocess"]) == spec


def test_pretrained_weights_file_fills_the_backbone_and_a_new_head_is_made(tmp_path: Path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    imagenet_like = build_model("resnet18", num_classes=1000)
    source = imagenet_like.state_dict()
    for path in (tmp_path / "r18.pth", tmp_path / "r18.safetensors"):
        if path.suffix == ".pth":
            torch.save(source, path)
        else:
            save_file({k: v.contiguous() for k, v in source.items()}, str(path))
        model = build_model("resnet18", num_classes=3, pretrained=str(path))
        own = model.state_dict()
        assert own["fc.weight"].shape == (3, 512)
        assert all(torch.equal(own[k], source[k]) for k in own if not k.startswith("fc."))
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_a_weights_file_for_another_architecture_is_a_clear_error(tmp_path: Path):
    torch.save(build_model("smallcnn", num_classes=10, in_channels=3).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit ResNet"):
        build_model("resnet18", num_classes=3, pretrained=str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError):
        build_model("resnet18", num_classes=3, pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                       ("efficientnet_b0", "classifier.1"), ("convnext_tiny", "classifier.2"),
                                       ("vit_b_16", "heads.head"), ("smallcnn", "20")])
def test_the_classifier_head_is_found_and_replaced_for_each_family(name, head):
    from tasks.models import head_name, replace_head

    model = build_model(name, num_classes=5, in_channels=3)
    assert head_name(model) == head
    replace_head(model, 7)
    assert model.get_submodule(head).out_features == 7


def test_a_vision_transformer_is_built_for_the_image_size_from_scratch_and_refused_at_another_with_weights():
    import torch

    vit = build_model("vit_b_32", num_classes=3, image_size=64).eval()
    with torch.inference_mode():
        assert vit(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="cannot build 'vit_b_32' for 40-pixel images"):
        build_model("vit_b_32", num_classes=3, image_size=40)  # not a multiple of the 32-pixel patch
    with pytest.raises(ValueError, match="takes 224-pixel images, but train.image_size is 64"):
        build_model("vit_b_16", num_classes=3, image_size=64, pretrained="DEFAULT")  # checked before any download
