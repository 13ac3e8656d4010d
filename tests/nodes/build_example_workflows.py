"""Write the example workflows (`example_workflows/*.json`) and their template thumbnails.

    METAQUERIES_MODELS_DIR=DIR python tests/nodes/build_example_workflows.py
        rewrite example_workflows/*.json; DIR is a make_example_models.py output, the model widgets are checked
        against what the loaders list there
    python tests/nodes/build_example_workflows.py --thumbnails OUT_DIR/screenshots
        template thumbnails (example_workflows/*.jpg) from a comfy_acceptance.sh run's screenshots

The widgets name the toy-world models and use their sampling settings (32 px, 20 DPM++ steps, guidance 5.0 / 5.0).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository and this folder importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_example_models import (
    CHECKPOINT_NAME,
    INTERNVL_NAME,
    MLLM_NAME,
    OPENUNI_NAME,
    SANA_NAME,
    SD15_NAME,
)
from workflow_kit import WORKFLOW_DIR, Graph, check_workflow

from metaqueries_core.comfy_files import INPUT_IMAGES
from training.toyjob import ToyJobConfig


def _note(g: Graph, text: str, pos: tuple[int, int] = (40, 40)) -> None:
    g.add("Note", pos, box=350, title="Models this workflow expects", text=text)


_MODELS = (
    "models/LLM/{mllm}/  (the frozen MLLM, a Hugging Face folder; models/text_encoders/ works too)\n"
    "models/metaqueries/{checkpoint}  (MetaQuery checkpoint: queries + connector)\n"
)
_SANA = f"models/diffusers/{SANA_NAME}/  (Sana decoder, a diffusers folder)\n"
_TOY = (
    "\nThe names are the tiny toy-world models; `python tests/nodes/make_example_models.py ComfyUI/models` writes "
    "random stand-ins. Swap in real ones (e.g. Qwen2.5-VL-3B-Instruct + a MetaQuery checkpoint + Sana 1600M)."
)
_INPUT = "\nInput images go in ComfyUI/input/ ({images})."


def _loaders(
    g: Graph, *, mllm_name: str = MLLM_NAME, checkpoint: str = CHECKPOINT_NAME, decoder: bool = True
) -> tuple[dict, ...]:
    mllm = g.add("MetaQueries_LoadMLLM", (40, 330), mllm_name=mllm_name)
    ckpt = g.add("MetaQueries_LoadCheckpoint", (40, 500), checkpoint_name=checkpoint)
    if not decoder:
        return mllm, ckpt
    dec = g.add("MetaQueries_LoadDecoder", (40, 670), decoder_name=SANA_NAME)
    g.connect(ckpt, "checkpoint", dec, "checkpoint")
    return mllm, ckpt, dec


_PROMPTS = (("positive", "a red circle on the left", 40), ("negative", "", 380))  # (key, prompt, y)


def _conditioning(g: Graph, mllm: dict, ckpt: dict, key: str, prompt: str, y: int) -> dict:
    """MetaQuery Encode -> MetaQuery Connector for one prompt; returns the connector node."""
    enc = g.add("MetaQueries_Encode", (420, y), title=f"MetaQuery Encode ({key})", prompt=prompt)
    g.connect(mllm, "mllm", enc, "mllm")
    g.connect(ckpt, "checkpoint", enc, "checkpoint")
    conn = g.add("MetaQueries_Connector", (780, y + 60))
    g.connect(enc, "query_states", conn, "query_states")
    return conn


def _sample(g: Graph, dec: dict, pos: tuple[int, int], **values) -> dict:
    # the toy-world models' own sampling settings: the toy job's (32 px images, 20 DPM++ steps, guidance 5.0 / 5.0)
    job = ToyJobConfig()
    kw = dict(width=job.image_size, height=job.image_size, steps=job.eval_steps, guidance=job.guidance)
    kw.update(image_guidance=job.image_guidance, seed=0, scheduler="dpmpp_2m")
    sample = g.add("MetaQueries_DiffusionSample", pos, **{**kw, **values})
    g.connect(dec, "decoder", sample, "decoder")
    save = g.add("SaveImage", (pos[0] + 360, pos[1]), box=300, filename_prefix="metaqueries")
    g.connect(sample, "image", save, "images")
    return sample


def _text_to_image(note: str, **loaders: str) -> Graph:
    g = Graph()
    _note(g, note)
    mllm, ckpt, dec = _loaders(g, **loaders)
    prompts = {key: _conditioning(g, mllm, ckpt, key, text, y) for key, text, y in _PROMPTS}
    sample = _sample(g, dec, (1100, 200))
    for key, conn in prompts.items():
        g.connect(conn, "conditioning", sample, key)
    return g


def text_to_image_sana() -> Graph:
    models = _MODELS.format(mllm=MLLM_NAME, checkpoint=CHECKPOINT_NAME)
    return _text_to_image("Text to image with a Sana decoder.\n\n" + models + _SANA + _TOY)


def text_to_image_openuni() -> Graph:
    note = (
        "Text to image with an OpenUni checkpoint (InternVL3 + Sana). Put OpenUni's .pth in models/metaqueries/: "
        "Load MetaQuery Checkpoint imports it as it loads (or convert it once: python -m "
        "metaqueries_core.importers.openuni CKPT.pth models/metaqueries/NAME.safetensors --mllm "
        "models/LLM/InternVL3-1B-hf).\n"
        'Its prompt format comes with it ("Generate an image: ..."; an empty negative is OpenUni\'s unconditional '
        "prompt); it takes no input images.\n\n"
        + _MODELS.format(mllm=INTERNVL_NAME, checkpoint=OPENUNI_NAME)
        + _SANA
        + "\nThe names are tiny random stand-ins (`python tests/nodes/make_example_models.py ComfyUI/models`). With "
        "the real ones (OpenUni-B-512: InternVL3-1B-hf, its .pth, Sana_600M_512px_diffusers) use "
        "512 x 512, 20 steps, guidance 4.5 (OpenUni's own settings)."
    )
    return _text_to_image(note, mllm_name=INTERNVL_NAME, checkpoint=OPENUNI_NAME)


def _edit_graph(instruction: str, images: list[str], what: str) -> Graph:
    g = Graph()
    files = ", ".join(images)
    text = (
        what
        + "\n\n"
        + _MODELS.format(mllm=MLLM_NAME, checkpoint=CHECKPOINT_NAME)
        + _SANA
        + _INPUT.format(images=files)
        + _TOY
    )
    _note(g, text)
    mllm, ckpt, dec = _loaders(g)
    edit = g.add("MetaQueries_EditConditioning", (780, 40), box=360, instruction=instruction)
    g.connect(mllm, "mllm", edit, "mllm")
    g.connect(ckpt, "checkpoint", edit, "checkpoint")
    for i, name in enumerate(images, start=1):
        load = g.add("LoadImage", (420, 40 + 380 * (i - 1)), box=320, image=name)
        g.connect(load, "IMAGE", edit, f"image_{i}")
    sample = _sample(g, dec, (1180, 40))
    for output in ("positive", "negative", "image_negative"):
        g.connect(edit, output, sample, output)
    return g


def editing() -> Graph:
    what = (
        "Instruction-based editing: Edit Conditioning encodes [instruction + image], [negative + image] and "
        "[negative + black image] in one pass; Diffusion Sample applies text and image guidance. The three outputs "
        "also fit core DualCFGGuider (cond1, cond2, negative)."
    )
    return _edit_graph("make the circle blue", [INPUT_IMAGES[0]], what)


def subject_driven() -> Graph:
    what = "Subject-driven generation from two reference images of the same subject (image_3 takes a third)."
    return _edit_graph("the object from the image above a purple square", list(INPUT_IMAGES[1:3]), what)


def sd15_core_ksampler() -> Graph:
    g = Graph()
    text = (
        "MetaQuery conditioning driving core KSampler with an SD1.5 checkpoint loaded by core "
        "CheckpointLoaderSimple (its CLIP output stays unused: the MLLM + connector replace it).\n\n"
        + _MODELS.format(mllm=MLLM_NAME, checkpoint=SD15_NAME)
        + f"models/checkpoints/{SD15_NAME}  (SD1.5 checkpoint, single file)\n"
        + _TOY
    )
    _note(g, text)
    mllm, ckpt = _loaders(g, checkpoint=SD15_NAME, decoder=False)
    sd = g.add("CheckpointLoaderSimple", (40, 670), ckpt_name=SD15_NAME)
    latent = g.add("EmptyLatentImage", (780, 560), width=64, height=64, batch_size=1)
    sampler = g.add(
        "KSampler", (1120, 200), seed=0, steps=20, cfg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0
    )
    for key, text, y in _PROMPTS:
        g.connect(_conditioning(g, mllm, ckpt, key, text, y), "conditioning", sampler, key)
    g.connect(sd, "MODEL", sampler, "model")
    g.connect(latent, "LATENT", sampler, "latent_image")
    decode = g.add("VAEDecode", (1460, 200), box=200)
    g.connect(sampler, "LATENT", decode, "samples")
    g.connect(sd, "VAE", decode, "vae")
    save = g.add("SaveImage", (1700, 200), box=300, filename_prefix="metaqueries_sd15")
    g.connect(decode, "IMAGE", save, "images")
    return g


def understanding() -> Graph:
    g = Graph()
    text = (
        "Understanding: the MLLM stays frozen, so it still answers questions about images.\n\n"
        f"models/LLM/{MLLM_NAME}/  (the frozen MLLM, a Hugging Face folder)\n"
        + _INPUT.format(images=INPUT_IMAGES[0])
        + _TOY
    )
    _note(g, text)
    mllm = g.add("MetaQueries_LoadMLLM", (40, 330), mllm_name=MLLM_NAME)
    load = g.add("LoadImage", (420, 40), image=INPUT_IMAGES[0])
    question = "what is the colour of the circle?"
    taught = "Describe the image or caption."  # the toy MLLM answers in the prompt format it was taught
    ask = g.add("MetaQueries_Describe", (780, 200), box=360, question=question, system_prompt=taught, max_new_tokens=8)
    g.connect(mllm, "mllm", ask, "mllm")
    g.connect(load, "IMAGE", ask, "image")
    show = g.add("PreviewAny", (1180, 200), box=360)
    g.connect(ask, "text", show, "source")
    return g


WORKFLOWS: dict[str, Callable[[], Graph]] = {
    "text_to_image_sana": text_to_image_sana,
    "text_to_image_openuni": text_to_image_openuni,
    "editing": editing,
    "subject_driven": subject_driven,
    "sd15_core_ksampler": sd15_core_ksampler,
    "understanding": understanding,
}


def write_thumbnails(screenshot_dir: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Template thumbnails `example_workflows/<name>.jpg` from the acceptance run's screenshots of each loaded
    workflow (`NN_<name>.png`): the graph's own area of the screen (from its saved view), on the canvas colour."""
    from PIL import Image

    for name in WORKFLOWS:
        (shot,) = screenshot_dir.glob(f"[0-9][0-9]_{name}.png")
        doc = json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))
        scale, (ox, oy) = doc["extra"]["ds"]["scale"], doc["extra"]["ds"]["offset"]
        nodes = doc["nodes"]
        x0 = (min(n["pos"][0] for n in nodes) + ox) * scale - 10
        y0 = (min(n["pos"][1] for n in nodes) - 30 + oy) * scale - 10
        x1 = (max(n["pos"][0] + n["size"][0] for n in nodes) + ox) * scale + 10
        y1 = (max(n["pos"][1] + n["size"][1] for n in nodes) + oy) * scale + 10
        screen = Image.open(shot).convert("RGB")
        graph = screen.crop(tuple(round(v) for v in (x0, y0, x1, y1)))
        graph.thumbnail(size, Image.LANCZOS)
        thumb = Image.new("RGB", size, screen.getpixel((int(x0) - 5, int(y1) - 5)))
        thumb.paste(graph, ((size[0] - graph.width) // 2, (size[1] - graph.height) // 2))
        thumb.save(WORKFLOW_DIR / f"{name}.jpg", quality=85)
        print(WORKFLOW_DIR / f"{name}.jpg")


def main() -> int:
    if sys.argv[1:2] == ["--thumbnails"]:
        write_thumbnails(Path(sys.argv[2]))
        return 0
    WORKFLOW_DIR.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        doc = build().to_json(name)
        problems = check_workflow(doc)
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
        path = WORKFLOW_DIR / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
