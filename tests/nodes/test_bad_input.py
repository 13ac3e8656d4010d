"""Bad input gets errors that say what is wrong and where; an interrupt stops sampling and leaves nothing behind."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from conftest import SANA_NAME, SD15_TINY, WRONG_WIDTH_CHECKPOINT

from nodes import (
    Connector,
    DiffusionSample,
    EditConditioning,
    Encode,
    LoadCheckpoint,
    LoadDecoder,
    LoadMLLM,
    comfy_env,
)
from nodes.common import QueryStates, image_to_pil


def cond(batch: int, tokens: int = 8, width: int = 64) -> list:
    return [[torch.randn(batch, tokens, width), {}]]


def run_sample(decoder, positive, negative, **kw):
    args = dict(width=32, height=32, batch_size=1, steps=2, guidance=4.0, image_guidance=1.5, seed=0)
    args.update(kw)
    return DiffusionSample().sample(decoder, positive, negative, scheduler=args.pop("scheduler", "euler"), **args)


@pytest.mark.parametrize(
    "loader,name,what,folders",
    [
        (LoadMLLM, "no-such-mllm", "MLLM folder", ["LLM", "text_encoders"]),
        (LoadCheckpoint, "no-such.safetensors", "MetaQuery checkpoint", ["metaqueries"]),
        (LoadDecoder, "no-such-decoder", "decoder folder", ["diffusers"]),
    ],
)
def test_missing_model_names_the_entry_and_where_it_looked(models_root, loader, name, what, folders):
    with pytest.raises(FileNotFoundError) as e:
        loader().load(name, "auto", "auto")
    message = str(e.value)
    assert what in message and repr(name) in message
    for folder in folders:
        assert str(models_root / folder) in message


def test_a_cut_short_checkpoint_file_is_named(models_root):
    # an interrupted copy or download leaves a file the safetensors reader cannot parse
    cut = models_root / "metaqueries" / "cut.safetensors"
    cut.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")  # the models folder is shared by the session
    try:
        with pytest.raises(ValueError, match=r"cut\.safetensors' is not a readable \.safetensors file"):
            LoadCheckpoint().load("cut.safetensors", "auto", "auto")
    finally:
        cut.unlink()


def test_checkpoint_for_another_mllm_names_both_widths(loaded):
    (wrong,) = LoadCheckpoint().load(WRONG_WIDTH_CHECKPOINT, "auto", "auto")
    with pytest.raises(ValueError, match=re.escape("MLLM width: checkpoint 96, loaded MLLM 64")):
        Encode().encode(loaded["mllm"], wrong, "a red circle")
    with pytest.raises(ValueError, match="checkpoint 96, loaded MLLM 64"):
        EditConditioning().encode(loaded["mllm"], wrong, "x", "", torch.rand(1, 32, 32, 3))


def test_checkpoint_for_another_decoder_names_both(loaded):
    with pytest.raises(ValueError, match=re.escape("decoder family: checkpoint 'sana', loaded 'sd15'")):
        LoadDecoder().load(SD15_TINY, "auto", "auto", checkpoint=loaded["checkpoint"])


def test_conditioning_of_the_wrong_width_for_the_decoder(loaded):
    with pytest.raises(ValueError, match="conditioning width 64 does not match the sd15 decoder's text width 32"):
        run_sample(loaded["sd15"], cond(1), cond(1))


def test_empty_image_batch(loaded):
    empty = torch.zeros(0, 32, 32, 3)
    with pytest.raises(ValueError, match="image is an empty image batch"):
        Encode().encode(loaded["mllm"], loaded["checkpoint"], "x", empty)
    with pytest.raises(ValueError, match="image_2 is an empty image batch"):
        EditConditioning().encode(loaded["mllm"], loaded["checkpoint"], "x", "", torch.rand(1, 32, 32, 3), empty)


def test_image_batches_that_disagree(loaded):
    with pytest.raises(ValueError, match=re.escape("image batch sizes {'image_1': 2, 'image_2': 3} disagree")):
        EditConditioning().encode(
            loaded["mllm"], loaded["checkpoint"], "x", "", torch.rand(2, 32, 32, 3), torch.rand(3, 32, 32, 3)
        )


def test_positive_and_negative_batches_that_disagree(loaded):
    with pytest.raises(ValueError, match=r"batch sizes disagree: \{'positive': \(2, 8, 64\), 'negative': \(3, 8, 64\)"):
        run_sample(loaded["sana"], cond(2), cond(3))
    with pytest.raises(ValueError, match="image_negative"):
        run_sample(loaded["sana"], cond(2), cond(1), image_negative=cond(3))
    with pytest.raises(ValueError, match="shapes disagree beyond the batch"):
        run_sample(loaded["sana"], cond(1), cond(1, tokens=5))
    image, _ = run_sample(loaded["sana"], cond(2), cond(1))  # a single negative is shared
    assert image.shape[0] == 2


def test_combined_conditioning_is_refused_with_a_pointer_to_core(loaded):
    with pytest.raises(ValueError, match="exactly one.*core KSampler"):
        run_sample(loaded["sana"], cond(1) + cond(1), cond(1))


def test_size_and_scheduler_the_decoder_cannot_take(loaded):
    with pytest.raises(ValueError, match="multiples of"):
        run_sample(loaded["sana"], cond(1), cond(1), width=33)
    with pytest.raises(ValueError, match="scheduler 'ddim' is not available.*allowed: dpmpp_2m, euler, unipc"):
        run_sample(loaded["sana"], cond(1), cond(1), scheduler="ddim")


def test_interrupt_stops_sampling_and_the_next_run_works(loaded, monkeypatch):
    dec = loaded["sana"]
    pos, neg = cond(1), cond(1)
    expected, _ = run_sample(dec, pos, neg, steps=5)
    progress, calls, emptied = [], [], []
    original = dec.predict
    monkeypatch.setattr(dec, "predict", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(comfy_env, "soft_empty_cache", lambda: emptied.append(1))

    class Bar:  # the user presses Cancel while step 2 is reported
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            progress.append((value, total))
            if value == 2 and not emptied:
                comfy_env.interrupt_current_processing()

    monkeypatch.setattr(comfy_env, "progress_bar", Bar)
    with pytest.raises(comfy_env.InterruptProcessingException):
        run_sample(dec, pos, neg, steps=5)
    assert progress == [(1, 6), (2, 6)] and len(calls) == 3  # stopped right after the step that saw the request
    assert emptied == [1]  # memory released on the way out
    progress.clear()
    again, _ = run_sample(dec, pos, neg, steps=5)  # the request was consumed: the next run is whole and identical
    assert progress == [(i, 6) for i in range(1, 7)] and torch.equal(again, expected)  # 5 steps, 1 decoded image


def test_interrupt_between_decoded_images_stops_the_decode(loaded, monkeypatch):
    dec = loaded["sana"]
    decoded, progress = [], []
    original = dec.decode
    monkeypatch.setattr(dec, "decode", lambda latents: decoded.append(latents.shape[0]) or original(latents))

    class Bar:  # the user presses Cancel when the first of three images is decoded
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            progress.append((value, total))
            if value == 3:
                comfy_env.interrupt_current_processing()

    monkeypatch.setattr(comfy_env, "progress_bar", Bar)
    with pytest.raises(comfy_env.InterruptProcessingException):
        run_sample(dec, cond(1), cond(1), steps=2, batch_size=3)
    assert progress == [(1, 5), (2, 5), (3, 5)] and decoded == [1]  # one image at a time; the second never started


def test_an_interrupt_requested_before_sampling_stops_it_at_once(loaded, monkeypatch):
    calls = []
    monkeypatch.setattr(loaded["sana"], "predict", lambda *a: calls.append(1))
    comfy_env.interrupt_current_processing()
    with pytest.raises(comfy_env.InterruptProcessingException):
        run_sample(loaded["sana"], cond(1), cond(1))
    assert calls == []
    comfy_env.throw_if_interrupted()  # cleared


def test_describe_stops_on_interrupt(mllm_loader):
    """The Describe node checks ComfyUI's interrupt after every token and leaves no interrupt pending."""
    from nodes import comfy_env
    from nodes.understanding import Describe

    mllm = mllm_loader("qwen2_5_vl")
    comfy_env.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy_env.InterruptProcessingException):
            Describe().ask(mllm, "what colour?", "", 8)
    finally:
        comfy_env.interrupt_current_processing(False)
    (text,) = Describe().ask(mllm, "what colour?", "", 2)
    assert isinstance(text, str)


def test_a_prompt_template_checkpoint_refuses_input_images_by_name(models_root):
    """An imported OpenUni checkpoint writes its prompts from a template without image placeholders: an edit graph
    (or an image on MetaQuery Encode) stops with that reason, not with a shape error."""
    from conftest import INTERNVL_NAME, OPENUNI_NAME

    (mllm,) = LoadMLLM().load(INTERNVL_NAME, "auto", "auto")
    (checkpoint,) = LoadCheckpoint().load(OPENUNI_NAME, "auto", "auto")
    message = "writes its prompts from a template .*, which takes no input images"
    with pytest.raises(ValueError, match=message):
        EditConditioning().encode(mllm, checkpoint, "make it blue", "", torch.rand(1, 32, 32, 3))
    with pytest.raises(ValueError, match=message):
        Encode().encode(mllm, checkpoint, "a red circle", torch.rand(1, 32, 32, 3))
    (states,) = Encode().encode(mllm, checkpoint, "a red circle")
    assert states.states.shape[:2] == (1, checkpoint.config.num_queries)


def test_conditioning_options_sample_would_ignore_are_refused(loaded):
    positive = [[torch.randn(1, 8, 64), {"strength": 0.5, "start_percent": 0.2}]]
    with pytest.raises(ValueError, match=r"positive carries \['start_percent', 'strength'\], which Diffusion Sample"):
        run_sample(loaded["sana"], positive, cond(1))
    zeroed = [[torch.randn(1, 8, 64), {"pooled_output": torch.zeros(1, 8)}]]  # e.g. Conditioning Zero Out
    image, _ = run_sample(loaded["sana"], zeroed, cond(1))
    assert image.shape == (1, 32, 32, 3)


def test_steps_beyond_the_schedulers_training_timesteps_are_refused(loaded):
    with pytest.raises(ValueError, match=r"steps must be 1\.\.999 for this sd15 decoder's ddim scheduler"):
        run_sample(loaded["sd15"], cond(1, width=32), cond(1, width=32), steps=1000, scheduler="ddim")


def test_a_checkpoint_that_tuned_its_decoder_needs_its_weights_in_the_decoder(loaded):
    base = loaded["checkpoint"]
    weights = {k: v + 0.01 for k, v in loaded["sana"].denoiser.state_dict().items()}
    tuned = replace(base, name="tuned.safetensors", decoder_state=weights)
    states = Encode().encode(loaded["mllm"], tuned, "a red circle")[0].states
    (positive,) = Connector().connect(QueryStates(states, tuned))
    (negative,) = Connector().connect(QueryStates(states, tuned))
    with pytest.raises(ValueError, match=r"comes from checkpoint 'tuned.safetensors', which fine-tuned its decoder"):
        run_sample(loaded["sana"], positive, negative)
    (decoder,) = LoadDecoder().load(SANA_NAME, "auto", "auto", checkpoint=tuned)
    assert decoder.weights_from == "tuned.safetensors"
    image, _ = run_sample(decoder, positive, negative)
    assert image.isfinite().all()
    wrong = replace(tuned, decoder_state={k: v[..., :1] if v.ndim else v for k, v in weights.items()})
    with pytest.raises(ValueError, match=r"'tuned.safetensors' does not fit decoder .*: .* of the wrong shape"):
        LoadDecoder().load(SANA_NAME, "auto", "auto", checkpoint=wrong)


def test_rgba_images_are_composited_on_white_as_in_training():
    rgba = torch.zeros(1, 4, 4, 4)  # black, fully transparent
    rgba[0, :2, :, 3] = 1.0  # the top half opaque
    (pil,) = image_to_pil(rgba)
    pixels = torch.tensor(list(pil.getdata())).view(4, 4, 3)
    assert (pixels[:2] == 0).all() and (pixels[2:] == 255).all()


def test_a_checkpoint_that_cannot_be_imported_on_load_is_named(models_root):
    broken = models_root / "metaqueries" / "broken.pth"  # queries, but no connector or projector
    torch.save({"meta_queries": torch.zeros(4, 64)}, broken)
    try:
        with pytest.raises(ValueError, match=r"OpenUni checkpoint 'broken.pth' cannot be imported: .*projector"):
            LoadCheckpoint().load("broken.pth", "auto", "auto")
    finally:
        broken.unlink()
