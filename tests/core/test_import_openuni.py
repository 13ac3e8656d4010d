"""Importing OpenUni's .pth checkpoints: a state dict laid out as OpenUni saves its model (`meta_queries`,
`connector.layers.*`, `projector`, optionally `transformer.*`), built here for a tiny MLLM, must import into a head
whose query states and conditioning equal what OpenUni computes.

OpenUni's computation is written out below from its published description, independently of this pack's code: its
hand-written prompt ("Generate an image: ..." in a ChatML user turn, then "<img>"; "Generate an image." for the
unconditional branch), right padding, the queries appended after the padded prompt with positions counting real
tokens, the language model's last states at the queries; SigLIP-style connector layers and a Linear projector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText

from metaqueries_core.checkpoint import check_compatible, load_checkpoint
from metaqueries_core.importers.openuni import import_openuni, load_openuni, main
from metaqueries_core.sampling import Guidance, generate

FAMILY = "internvl"  # OpenUni's MLLM is InternVL3
INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"


class OpenUniAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))


class OpenUniLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.self_attn = OpenUniAttention(width, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.layer_norm2(x)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


class OpenUniHead(nn.Module):
    """meta_queries, connector (encoder layers, no final norm), projector: "enc_proj" or "proj_enc_proj"."""

    def __init__(self, llm_width, out_width, *, width=None, depth=2, hidden=None, num_queries=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        width = width or llm_width
        self.meta_queries = nn.Parameter(torch.randn(num_queries, llm_width) / llm_width**0.5)
        self.connector = nn.Module()
        self.connector.layers = nn.ModuleList(
            OpenUniLayer(width, width // 64 if width >= 64 else 1, hidden or 3 * width + 8) for _ in range(depth)
        )
        if width == llm_width:
            self.projector = nn.Linear(width, out_width)
        else:
            self.projector = nn.ModuleList([nn.Linear(llm_width, width), nn.Linear(width, out_width)])
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name != "meta_queries":
                    p.copy_(
                        1 + 0.2 * torch.randn_like(p)
                        if "norm" in name and name.endswith("weight")
                        else 0.1 * torch.randn_like(p)
                    )

    def connect(self, states):
        if isinstance(self.projector, nn.ModuleList):
            states = self.projector[0](states)
        for layer in self.connector.layers:
            states = layer(states)
        return (self.projector[1] if isinstance(self.projector, nn.ModuleList) else self.projector)(states)


def language_model(path):
    return AutoModelForImageTextToText.from_pretrained(path).model.language_model.eval()


def openuni_states(path, tokenizer, queries, prompts):
    """OpenUni's read-out for a batch: right-padded prompts, queries appended after the padding."""
    texts = [
        INSTRUCTION.format(input=f"Generate an image: {p.strip()}" if p else "Generate an image.") + "<img>"
        for p in prompts
    ]
    ids = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    length = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([i + [pad] * (length - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    lm = language_model(path)
    b, n = len(prompts), queries.shape[0]
    embeds = torch.cat([lm.get_input_embeddings()(input_ids), queries[None].expand(b, -1, -1)], 1)
    mask = torch.cat([mask, torch.ones(b, n, dtype=torch.long)], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    return out[:, -n:]  # (B, N, D)


def write_pth(path, head: OpenUniHead, extra=None):
    torch.save({**{k: v.clone() for k, v in head.state_dict().items()}, **(extra or {})}, path)
    return path


@pytest.mark.parametrize("width", [None, 128], ids=["enc_proj", "proj_enc_proj"])
def test_imported_head_computes_what_openuni_does(width, mllm_folder, mllm_loader, decoder_loader, tiny_root, tmp_path):
    mllm, decoder = mllm_loader(FAMILY), decoder_loader("sana")
    ref = OpenUniHead(mllm.width, decoder.text_width, width=width).eval()
    pth = write_pth(tmp_path / "openuni.pth", ref)
    config = import_openuni(pth, tmp_path / "imported.safetensors", mllm=mllm_folder(FAMILY))
    assert (config.mllm_family, config.decoder_family, config.num_queries, config.system_prompt) == (
        FAMILY,
        "sana",
        6,
        None,
    )
    loaded, head, decoder_state = load_checkpoint(tmp_path / "imported.safetensors")
    check_compatible(loaded, mllm=mllm, decoder=decoder)
    assert decoder_state == {}

    prompts = ["a red circle", "", "two blue squares above a green triangle  "]  # "" is the unconditional branch
    expected = openuni_states(mllm_folder(FAMILY), mllm.tokenizer, ref.meta_queries.detach(), prompts)
    with torch.no_grad():
        states = head.states(mllm, head.prepare(mllm, prompts))  # (3, N, D), left-padded here
        torch.testing.assert_close(states, expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(head.connector(states), ref.connect(expected), atol=2e-5, rtol=1e-5)
    images = generate(mllm, head, decoder, ["a red circle"], height=32, width=32, steps=2, guidance=Guidance(scale=3.0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="writes its prompts from a template .*, which takes no input images"):
        head.prepare(mllm, ["make it blue"], [[Image.new("RGB", (32, 32))]])


def test_fine_tuned_decoder_is_taken(mllm_folder, mllm_loader, decoder_loader, tmp_path):
    mllm, decoder = mllm_loader(FAMILY), decoder_loader("sana")
    ref = OpenUniHead(mllm.width, decoder.text_width)
    tuned = {f"transformer.{k}": v + 1.0 for k, v in decoder.denoiser.state_dict().items()}
    pth = write_pth(tmp_path / "ft.pth", ref, {**tuned, "lmm.language_model.norm.weight": torch.ones(mllm.width)})
    import_openuni(pth, tmp_path / "ft.safetensors", mllm=mllm_folder(FAMILY), decoder="include")
    decoder_state = load_checkpoint(tmp_path / "ft.safetensors")[2]
    assert decoder_state.keys() == {k.removeprefix("transformer.") for k in tuned}
    assert all(torch.equal(decoder_state[k.removeprefix("transformer.")], v) for k, v in tuned.items())
    import_openuni(pth, tmp_path / "skip.safetensors", mllm=mllm_folder(FAMILY), decoder="skip")
    assert load_checkpoint(tmp_path / "skip.safetensors")[2] == {}


def test_bad_inputs_are_named(mllm_folder, mllm_loader, decoder_loader, tmp_path):
    mllm, decoder = mllm_loader(FAMILY), decoder_loader("sana")
    folder = mllm_folder(FAMILY)
    pth = write_pth(tmp_path / "ok.pth", OpenUniHead(mllm.width, decoder.text_width))
    with pytest.raises(ValueError, match="holds no fine-tuned Sana weights"):
        import_openuni(pth, tmp_path / "x.safetensors", mllm=folder, decoder="include")
    narrow = write_pth(tmp_path / "narrow.pth", OpenUniHead(mllm.width // 2, decoder.text_width))
    with pytest.raises(ValueError, match=rf"queries \(6, {mllm.width // 2}\) do not fit MLLM .* of width {mllm.width}"):
        import_openuni(narrow, tmp_path / "x.safetensors", mllm=folder)
    torch.save({"connector.layers.0.mlp.fc1.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an OpenUni checkpoint: it has no 'meta_queries'"):
        import_openuni(tmp_path / "other.pth", tmp_path / "x.safetensors", mllm=folder)
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable weights-only torch file"):
        import_openuni(tmp_path / "garbage.pth", tmp_path / "x.safetensors", mllm=folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_openuni(tmp_path / "missing.pth", tmp_path / "x.safetensors", mllm=folder)
    assert not (tmp_path / "x.safetensors").exists()
    assert main([str(pth), str(tmp_path / "cli.safetensors"), f"--mllm={folder}"]) == 0
    assert main([str(narrow), str(tmp_path / "bad.safetensors"), f"--mllm={folder}"]) == 2
    assert not (tmp_path / "bad.safetensors").exists()


def test_the_source_precision_is_kept(mllm_folder, mllm_loader, decoder_loader, tmp_path):
    """OpenUni and the reference save bf16: the file keeps it (half the size of fp32), loading casts as asked."""
    from safetensors import safe_open

    mllm, decoder = mllm_loader(FAMILY), decoder_loader("sana")
    ref = OpenUniHead(mllm.width, decoder.text_width).to(torch.bfloat16)
    import_openuni(write_pth(tmp_path / "bf16.pth", ref), tmp_path / "bf16.safetensors", mllm=mllm_folder(FAMILY))
    with safe_open(str(tmp_path / "bf16.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    _, head, _ = load_checkpoint(tmp_path / "bf16.safetensors", dtype=torch.float32)
    assert head.queries.queries.dtype == torch.float32
    assert torch.equal(head.queries.queries, ref.meta_queries.float())


def test_loading_the_pth_in_memory_gives_the_imported_head(mllm_folder, mllm_loader, decoder_loader, tmp_path):
    """What Load MetaQuery Checkpoint does with a .pth: the same head and prompt format as the import, family
    InternVL (OpenUni's released MLLM), and another MLLM refused by check_compatible."""
    mllm, decoder = mllm_loader(FAMILY), decoder_loader("sana")
    ref = OpenUniHead(mllm.width, decoder.text_width).to(torch.bfloat16)
    tuned = {f"transformer.{k}": v for k, v in decoder.denoiser.state_dict().items()}
    pth = write_pth(tmp_path / "openuni.pth", ref, tuned)
    import_openuni(pth, tmp_path / "imported.safetensors", mllm=mllm_folder(FAMILY))
    imported, head, decoder_state = load_checkpoint(tmp_path / "imported.safetensors", dtype=torch.bfloat16)
    config, in_memory, in_memory_decoder = load_openuni(pth)
    assert config.mllm_family == "internvl" and config.head_settings() == imported.head_settings()
    a, b = head.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert decoder_state.keys() == in_memory_decoder.keys()
    check_compatible(config, mllm=mllm, decoder=decoder)
    with pytest.raises(ValueError, match="MLLM family: checkpoint 'internvl', loaded 'qwen2_5_vl'"):
        check_compatible(config, mllm=mllm_loader("qwen2_5_vl"))
    pth.write_bytes(bytes(pth.stat().st_size))  # not views of the memory-mapped file: overwriting changes nothing
    assert all(torch.equal(a[k], v) for k, v in in_memory.state_dict().items())
    assert all(torch.equal(decoder_state[k], v.to(decoder_state[k].dtype)) for k, v in in_memory_decoder.items())


class _Payload:
    """Unpickling this would run code: it writes the file named."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_refused_unrun(mllm_folder, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"meta_queries": torch.zeros(8, 64), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a readable weights-only torch file"):
        import_openuni(tmp_path / "evil.pth", tmp_path / "x.safetensors", mllm=mllm_folder(FAMILY))
    with pytest.raises(ValueError, match="not a readable weights-only torch file") as refused:
        load_openuni(tmp_path / "evil.pth")
    assert not marker.exists()
    assert "never unpickles" in str(refused.value) and "weights_only" not in str(refused.value)  # no unsafe advice


def test_outputs_wrappers_legacy_files_and_mllm_folders(mllm_folder, mllm_loader, decoder_loader, tmp_path, capsys):
    mllm, decoder = mllm_loader(FAMILY), decoder_loader("sana")
    folder = mllm_folder(FAMILY)
    pth = write_pth(tmp_path / "ok.pth", OpenUniHead(mllm.width, decoder.text_width))
    before = pth.read_bytes()
    with pytest.raises(ValueError, match="would overwrite or sit inside the checkpoint being imported"):
        import_openuni(pth, pth, mllm=folder, overwrite=True)
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        import_openuni(pth, tmp_path / "converted.pth", mllm=folder)
    assert pth.read_bytes() == before  # the source survives
    state = torch.load(pth, weights_only=True)
    for wrapper in ("model", "module"):  # how training scripts often save: nested one level down
        torch.save({wrapper: state, "step": 5}, tmp_path / f"{wrapper}.pth")
        assert import_openuni(tmp_path / f"{wrapper}.pth", tmp_path / f"{wrapper}.safetensors", mllm=folder)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert import_openuni(tmp_path / "legacy.pth", tmp_path / "legacy.safetensors", mllm=folder)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text('{"model_type": "internvl_chat", "llm_config": {"hidden_size": 64}}')
    with pytest.raises(ValueError, match="remote-code layout; load its transformers-native '-hf' folder"):
        import_openuni(pth, tmp_path / "remote.safetensors", mllm=remote)
    with pytest.raises(SystemExit):
        main([str(pth), str(tmp_path / "h.safetensors"), f"--mllm={folder}", "--heads=-1"])
    assert "--heads: must be >= 1" in capsys.readouterr().err
