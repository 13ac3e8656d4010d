"""Load tiny Qwen2.5-VL and Sana folders from disk and write a text-to-image and an edit PNG.

    python scripts/demo_tiny.py OUT_DIR

The models are random (built offline by the tiny-model kit), so the pictures are noise-like; the point is the path:
folders on disk -> adapters -> MetaQuery head -> checkpoint round trip -> CFG / image-CFG sampling -> PNG.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image

from metaqueries_core.checkpoint import check_compatible, config_for, load_checkpoint, save_checkpoint
from metaqueries_core.connector import ConnectorConfig
from metaqueries_core.decoders import load_decoder
from metaqueries_core.decoders.tiny import write_tiny_sana
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.images import tensor_to_pil
from metaqueries_core.mllm import load_mllm
from metaqueries_core.sampling import Guidance, generate
from metaqueries_core.tinykit import write_tiny_mllm


def main(out: Path) -> None:
    t0 = time.perf_counter()
    mllm = load_mllm(write_tiny_mllm("qwen2_5_vl", out / "qwen2_5_vl"))
    decoder = load_decoder(write_tiny_sana(out / "sana"))
    print(
        f"MLLM {mllm.model.config.model_type} width {mllm.width}; decoder {decoder.family} text width {decoder.text_width}"
    )
    head = MetaQueryHead(
        num_queries=16, connector=ConnectorConfig(in_width=mllm.width, out_width=decoder.text_width, depth=2)
    )
    path = save_checkpoint(out / "metaquery.safetensors", head, config_for(head, mllm=mllm, decoder=decoder))
    config, head, _ = load_checkpoint(path)
    check_compatible(config, mllm=mllm, decoder=decoder)
    t2i = generate(
        mllm,
        head,
        decoder,
        ["a red circle on the left"],
        height=32,
        width=48,
        steps=4,
        seed=0,
        guidance=Guidance(scale=4.5),
    )
    tensor_to_pil(t2i)[0].save(out / "text_to_image.png")
    source = Image.new("RGB", (32, 32), (0, 0, 0))
    source.paste((255, 0, 0), (8, 8, 24, 24))
    edit = generate(
        mllm,
        head,
        decoder,
        ["make the square blue"],
        images=[[source]],
        height=32,
        width=32,
        steps=4,
        seed=0,
        guidance=Guidance(scale=4.5, image_scale=1.5),
    )
    tensor_to_pil(edit)[0].save(out / "edit.png")
    print(
        f"wrote {out / 'text_to_image.png'} {tuple(t2i.shape)} and {out / 'edit.png'} {tuple(edit.shape)} "
        f"in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo_tiny"))
