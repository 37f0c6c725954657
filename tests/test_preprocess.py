"""tasks/preprocess.py: the one image policy shared by training, evaluation and serving."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    load_tensor,
    normalize,
    open_image,
    to_mode,
    to_uint8_tensor,
)


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int64)


# --- Preprocess spec -----------------------------------------------------------------------------------

def test_for_mode_picks_channels_and_stats():
    gray = Preprocess.for_mode("L", 28)
    colour = Preprocess.for_mode("RGB", 224)
    assert (gray.channels, gray.mean, gray.std, gray.size) == (1, (0.5,), (0.5,), 28)
    assert (colour.channels, colour.mean, colour.std) == (3, IMAGENET_MEAN, IMAGENET_STD)


def test_spec_round_trips_through_a_plain_dict():
    spec = Preprocess.for_mode("RGB", 64)
    data = spec.to_dict()
    assert data["mode"] == "RGB" and data["size"] == 64
    # as if read back from JSON: lists, not tuples
    restored = Preprocess.from_dict({**data, "mean": list(data["mean"]), "std": list(data["std"])})
    assert restored == spec


# --- to_mode ---------------------------------------------------------------------------------------------

def test_rgba_is_composited_on_white_then_rgb():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[0, 1] = (0, 0, 255, 255)    # opaque blue -> blue
    rgba[0, 2] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    out = to_mode(Image.fromarray(rgba, mode="RGBA"), "RGB")
    assert out.mode == "RGB"
    px = _rgb(out)[0]
    assert tuple(px[0]) == (255, 255, 255)
    assert tuple(px[1]) == (0, 0, 255)
    assert all(abs(v - 127) <= 2 for v in px[2])


def test_rgba_to_grayscale_uses_white_background_too():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    out = to_mode(img, "L")
    assert out.mode == "L"
    assert np.asarray(out).min() == 255


def test_la_is_composited_on_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    out = to_mode(la, "L")
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[255, 0]]


def test_16_bit_grayscale_is_rescaled_not_clipped():
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert img.mode == "I;16"
    out = to_mode(img, "L")
    assert out.mode == "L"
    values = np.asarray(out)[0].tolist()
    assert values[0] == 0
    assert values[2] == 255
    assert abs(values[1] - 128) <= 1  # clipping would give 255


def test_16_bit_png_file_is_rescaled_to_rgb(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    out = to_mode(open_image(path), "RGB")
    assert out.mode == "RGB"
    px = _rgb(out)[0]
    assert tuple(px[0]) == (0, 0, 0)
    assert tuple(px[2]) == (255, 255, 255)
    assert all(abs(v - 128) <= 1 for v in px[1])


def test_32_bit_integer_image_above_255_is_rescaled():
    img = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(to_mode(img, "L"))[0].tolist() == [0, 255]


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    pal = Image.new("P", (4, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)  # index 0 red, index 1 blue
    pal.putdata([0, 1, 0, 1])
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)  # red is the transparent colour

    img = open_image(path)
    assert img.mode == "P" and "transparency" in img.info
    out = to_mode(img, "RGB")
    assert out.mode == "RGB"
    assert [tuple(p) for p in _rgb(out)[0]] == [(255, 255, 255), (0, 0, 255)] * 2


def test_palette_without_transparency_keeps_its_colours():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    pal.putdata([0, 1])
    out = to_mode(pal, "RGB")
    assert [tuple(p) for p in _rgb(out)[0]] == [(255, 0, 0), (0, 0, 255)]


def test_same_mode_is_returned_unchanged():
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_mode(img, "RGB").tobytes() == img.tobytes()


# --- open_image -------------------------------------------------------------------------------------

def _oriented_jpeg(orientation: int) -> bytes:
    """20 wide x 10 tall JPEG, left half black and right half white, with an EXIF Orientation tag."""
    arr = np.zeros((10, 20), dtype=np.uint8)
    arr[:, 10:] = 255
    img = Image.fromarray(arr, mode="L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_open_image_applies_exif_orientation(tmp_path):
    data = _oriented_jpeg(6)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    for source in (path, str(path), data):
        img = open_image(source)
        assert img.size == (10, 20)  # 90 degree rotation: now 10 wide, 20 tall
        gray = np.asarray(img.convert("L"), dtype=np.int64)
        # orientation 6 = rotate 90 clockwise to display: the left (black) half ends on top
        assert gray[:8].mean() < 40
        assert gray[12:].mean() > 215


def test_open_image_without_orientation_keeps_size():
    assert open_image(_oriented_jpeg(1)).size == (20, 10)


def test_exif_orientation_reaches_the_tensor():
    spec = Preprocess.for_mode("L", 10)
    tensor = load_tensor(_oriented_jpeg(6), spec)
    assert tuple(tensor.shape) == (1, 10, 10)
    top, bottom = tensor[0, :4].float().mean(), tensor[0, 6:].float().mean()
    left, right = tensor[0, :, :4].float().mean(), tensor[0, :, 6:].float().mean()
    assert top < 40 and bottom > 215          # dark above bright, as displayed
    assert abs(left - right) < 30             # not the unrotated left/right split


def test_open_image_reads_only_the_first_frame(tmp_path):
    frames = [Image.new("L", (4, 4), v) for v in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    img = open_image(path)
    assert np.asarray(img.convert("L")).max() <= 20


def test_open_image_is_fully_decoded_before_returning(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (4, 4), 77).save(path)
    img = open_image(path)
    path.unlink()  # pixels must not depend on the file any more
    assert np.asarray(img).tolist() == [[77] * 4] * 4


# --- tensors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
@pytest.mark.parametrize("source_size", [(16, 16), (40, 20), (7, 30)])
def test_to_uint8_tensor_shape(mode, channels, source_size):
    spec = Preprocess.for_mode(mode, 12)
    img = Image.new("RGB", source_size, (10, 120, 230))
    tensor = to_uint8_tensor(img, spec)
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (channels, 12, 12)


def test_to_uint8_tensor_keeps_colour_values():
    spec = Preprocess.for_mode("RGB", 8)
    tensor = to_uint8_tensor(Image.new("RGB", (16, 16), (10, 120, 230)), spec)
    assert tensor[:, 4, 4].tolist() == [10, 120, 230]


def test_to_uint8_tensor_centre_crops_the_longer_side():
    # 30 wide x 10 tall: a white centre third between black thirds
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 10:20] = 255
    tensor = to_uint8_tensor(Image.fromarray(arr, mode="L"), Preprocess.for_mode("L", 10))
    assert tuple(tensor.shape) == (1, 10, 10)
    assert tensor[0, :, 2:8].float().mean() > 240  # the crop is the white centre, not a squashed whole


def test_normalize_grayscale_maps_0_and_255_to_minus_one_and_one():
    spec = Preprocess.for_mode("L", 2)
    batch = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    out = normalize(batch, spec)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 1, 2, 2))
    assert batch.dtype == torch.uint8 and batch.tolist() == [[[[0, 255], [0, 255]]]]


def test_normalize_rgb_uses_the_spec_mean_and_std_per_channel():
    spec = Preprocess.for_mode("RGB", 3)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, 3, 3), dtype=torch.uint8, generator=gen)
    out = normalize(batch, spec)
    for c in range(3):
        expected = (batch[:, c].double() / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[:, c].double(), expected, atol=1e-5)


def test_normalize_with_custom_stats():
    spec = Preprocess(size=1, mode="RGB", mean=(0.0, 0.5, 1.0), std=(1.0, 0.25, 2.0))
    batch = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert normalize(batch, spec).flatten().tolist() == pytest.approx([1.0, 2.0, 0.0])


# --- policy additions: pixel cap before decoding, CMYK, notes -------------------------------------------

def test_open_image_refuses_images_over_the_pixel_cap_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from tasks.preprocess import ImagePolicyError

    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    called = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: called.append(1) or real_load(self))
    with pytest.raises(ImagePolicyError, match="90,000-pixel cap|pixel cap"):
        open_image(path, max_pixels=50_000)
    assert called == []
    assert open_image(path, max_pixels=90_000).size == (300, 300)


def test_cmyk_is_converted_explicitly():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    out = to_mode(cmyk, "RGB")
    assert out.mode == "RGB" and tuple(_rgb(out)[0, 0]) == (255, 0, 0)
    assert to_mode(cmyk, "L").mode == "L"


def test_policy_notes_say_what_the_policy_does():
    from tasks.preprocess import policy_notes

    assert policy_notes(Image.new("L", (2, 2))) == []
    notes = policy_notes(Image.new("RGBA", (2, 2)), n_frames=4, orientation=8)
    assert notes == ["first of 4 frames used", "EXIF orientation 8 applied", "transparency composited on white"]
    assert policy_notes(Image.new("CMYK", (2, 2))) == ["CMYK converted to RGB"]
    assert policy_notes(Image.new("I;16", (2, 2))) == ["I;16 rescaled to 8-bit (not clipped)"]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_an_image_already_at_size_skips_torchvision_with_identical_pixels(mode):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(0)
    shape = (24, 24) if mode == "L" else (24, 24, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    spec = Preprocess.for_mode(mode, 24)
    fast = to_uint8_tensor(img, spec)
    slow = F.center_crop(F.resize(F.pil_to_tensor(img), [24], antialias=True), [24, 24])
    assert fast.dtype == torch.uint8 and fast.shape == slow.shape and torch.equal(fast, slow)
