"""Image conversion shared by training data, the MLLM adapters, the decoders and the nodes: every Pillow mode becomes
RGB the same way everywhere, so a model sees at inference what it was trained on."""

import numpy as np
import torch
from PIL import Image

from metaqueries_core.images import pil_to_tensor, to_rgb


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
