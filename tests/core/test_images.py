"""Image conversion shared by training data, the MLLM adapters, the decoders and the nodes: every Pillow mode becomes
RGB the same way everywhere, so a model sees at inference what it was trained on."""

import numpy as np
import pytest
import torch
from PIL import Image

from metaqueries_core.images import pil_to_tensor, resize_center_crop, to_rgb


def test_to_rgb_modes():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))).getpixel((0, 0))[0] == 128


def test_inference_inputs_convert_as_training_data_does():
    import training.data.samples

    # the data readers convert with the library's function, not a training copy that drifts from it
    assert training.data.samples.to_rgb is to_rgb
    half_transparent_red = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    grey16 = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    out = pil_to_tensor([half_transparent_red, grey16])  # (2, 3, H, W) in [0, 1]
    # red over white at alpha 128: (255, 127, 127); 16-bit mid grey: 128 (Pillow's own conversion clips it to 255)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([255, 127, 127]) / 255.0, atol=1.5 / 255)
    assert torch.allclose(out[1, :, 0, 0], torch.full((3,), 128 / 255.0), atol=0.5 / 255)


@pytest.mark.parametrize(
    "size, scaled, box",
    [
        ((600, 400), (576, 384), (96, 0)),  # wide: the shorter side to 384, the longer truncated (int), centred
        ((401, 999), (384, 956), (0, 286)),  # tall: offsets rounded as torchvision's CenterCrop does
        ((384, 600), (384, 600), (0, 108)),  # the shorter side already fits: cropped only
        ((200, 100), (768, 384), (192, 0)),  # small images are scaled up
    ],
)
def test_resize_center_crop_is_torchvision_resize_then_center_crop(size, scaled, box):
    """Checked by hand against torchvision's v2 Resize(384) + CenterCrop(384) (the reference's LLaVA-OneVision input
    transform): pixel-identical on 11 sizes. Here: the same result built from PIL calls."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = resize_center_crop(image, 384)
    expected = image.resize(scaled, Image.BILINEAR) if scaled != size else image
    expected = expected.crop((box[0], box[1], box[0] + 384, box[1] + 384))
    assert out.size == (384, 384) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_resize_center_crop_keeps_a_square_of_its_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_center_crop(image, 32)), np.asarray(image))
