"""The typed config tree of `python -m training.run`. Defaults follow the MetaQuery reference recipe where it states
one (AdamW betas (0.9, 0.95), grad clip 0.5, cosine schedule with warm-up, 10% condition dropout per kind)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Literal

from metaqueries_core.mllm import DEFAULT_SYSTEM_PROMPT
from metaqueries_core.toyworld.world import CAPTION_KINDS

from .bounds import above, at_least, within
from .data.transforms import validate_buckets

MAX_SEED = 2**32 - 1  # numpy's and accelerate's set_seed limit


def expand_home(value: str | None) -> str | None:
    """A path option with a leading `~` expanded: `--key=~/x` reaches the program unexpanded (the shell expands `~`
    only at the start of a word), and every reader of the path must see the same folder."""
    return None if value is None else str(Path(value).expanduser()) if value.startswith("~") else value


def given_beyond_default(section: object, names: tuple[str, ...]) -> list[str]:
    """Which of `names` hold something other than their default: options a setting would silently ignore."""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(section)}
    return [name for name in names if getattr(section, name) != defaults[name]]


@dataclass
class ConnectorSection:
    depth: int = 24  # reference: 24 bidirectional Qwen2-style layers
    width: int | None = None  # None: the MLLM width
    heads: int | None = None  # None: width // 64
    mlp_ratio: float = 4.0
    # "reference": the MetaQuery reference code's layers exactly (what its imported checkpoints use)
    layer_style: Literal["qwen2", "reference", "siglip"] = "qwen2"
    pos_embed: Literal["rope", "none"] = "rope"
    qk_norm: bool = True
    final_norm: bool = True  # a norm after the last layer (the reference's and OpenUni's connectors have none)
    projection: Literal["mlp_norm", "linear"] = "mlp_norm"
    out_norm_scale: float | None = None  # None: sqrt(5.5) for Sana, 1.0 for SD1.5 (reference)
    out_norm_eps: float = 1e-6  # the reference's output norm: 1e-5
    init_std: float = 0.014
    # a learned embedding per query slot on the output (metaqueries_core.connector.ConnectorConfig.num_slots): off
    # in the reference; the toy world's two-object prompts need it to bind colours to shapes
    slot_embed: bool = False

    def __post_init__(self) -> None:
        at_least("model.connector.depth", self.depth, 0, " (0: the projection alone)")
        at_least("model.connector.width", self.width, 1, " (or null: the MLLM width)")
        at_least("model.connector.heads", self.heads, 1, " (or null: width // 64)")
        above("model.connector.mlp_ratio", self.mlp_ratio, 0)
        above("model.connector.out_norm_scale", self.out_norm_scale, 0, " (or null: sqrt(5.5) for Sana, 1 for SD1.5)")
        above("model.connector.out_norm_eps", self.out_norm_eps, 0)
        above("model.connector.init_std", self.init_std, 0)


@dataclass
class ModelSection:
    mllm: str = ""  # local Hugging Face folder of the frozen MLLM
    decoder: str = ""  # local diffusers folder (Sana or SD1.5)
    init_checkpoint: str | None = None  # a MetaQuery checkpoint to start from (instruct starts from pretrain)
    num_queries: int = 64  # 64-256 for Sana, 77 for SD1.5
    # None: random queries. A text: the queries start as the MLLM's own embeddings of its tokens (repeated to
    # num_queries), so the frozen MLLM treats the query slots like answer tokens and their states read the prompt
    queries_init_text: str | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_prompt_tokens: int = 256
    prompt_suffix: str = ""  # text between the generation prompt and the query slots (reference imports: "\n")
    # a whole prompt with "{caption}" used instead of the chat template, and the prompt of an empty caption (OpenUni
    # imports; metaqueries_core.mllm.PromptLayout)
    prompt_template: str = ""
    empty_prompt: str | None = None
    lead_slots: int = 0  # learned slots before the queries, not read out (reference imports: 1, its <begin_of_img>)
    # input images (instruct stage) scaled and centre-cropped to this square before the MLLM's own processing, as the
    # reference trains LLaVA-OneVision (384); None: the MLLM folder's processing alone
    image_crop: int | None = None
    # Qwen-VL MLLMs (instruct stage): input images smaller than this many image tokens are scaled up to it, as the
    # reference trains Qwen2.5-VL (256); None: the MLLM folder's own minimum
    min_image_tokens: int | None = None
    connector: ConnectorSection = field(default_factory=ConnectorSection)
    decoder_mode: Literal["frozen", "full", "lora"] = "frozen"  # the MLLM is always frozen
    lora_rank: int = 16
    mllm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # flow-matching decoders (Sana) only: noise levels s = shift(u) of uniform u during training, as Sana's sampler
    # shifts them; 1.0 (the reference) trains all levels equally, 3.0 spends more steps where the layout is decided
    train_shift: float = 1.0

    def __post_init__(self) -> None:
        self.mllm, self.decoder = expand_home(self.mllm), expand_home(self.decoder)
        self.init_checkpoint = expand_home(self.init_checkpoint)
        at_least("model.num_queries", self.num_queries, 1)
        at_least("model.max_prompt_tokens", self.max_prompt_tokens, 1)
        at_least("model.lead_slots", self.lead_slots, 0)
        at_least("model.image_crop", self.image_crop, 1, " (or null: no crop)")
        at_least("model.min_image_tokens", self.min_image_tokens, 1, " (or null: the MLLM folder's minimum)")
        at_least("model.lora_rank", self.lora_rank, 1)
        above("model.train_shift", self.train_shift, 0, " (1.0 = uniform noise levels)")
        if self.decoder_mode != "lora" and given_beyond_default(self, ("lora_rank",)):
            raise ValueError(
                f"model.lora_rank is set but model.decoder_mode={self.decoder_mode!r} trains no LoRA adapters; "
                "set model.decoder_mode=lora or drop model.lora_rank"
            )


FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "toyworld": (),
    "jsonl": (),
    "hf": ("layout", "split", "split_by", "prompt_choice"),
    "webdataset": ("split", "split_by", "caption_key", "instruction_key"),
}
FORMAT_OPTION_NAMES = tuple(sorted({name for names in FORMAT_OPTIONS.values() for name in names}))
FILE_OPTIONS = ("path", "resolution", "random_crop", "buckets")  # data read from files; not the toy world
TOYWORLD_OPTIONS = (
    "toyworld_size",
    "toyworld_seed",
    "toyworld_subject_fraction",
    "toyworld_caption_fraction",
    "toyworld_caption_mix",
)


@dataclass
class DataSection:
    kind: Literal["toyworld", "webdataset", "hf", "jsonl"] = "toyworld"
    path: str = ""  # shards dir / glob, dataset folder, or JSONL manifest; unused for toyworld
    resolution: int = 512  # training image side (square); toyworld uses its own size
    random_crop: bool = False
    buckets: list[list[int]] | None = None  # aspect-ratio buckets [[w, h], ...] instead of one resolution
    # options of one file format each (FORMAT_OPTIONS), refused for the other kinds; None: the reader's default
    layout: Literal["auto", "caption", "metaquery_instruct", "omniedit"] = "auto"  # hf column layout
    split: str | None = None  # which split a folder's files are read from (default "train")
    split_by: Literal["auto", "shard", "sample"] | None = None  # how processes share the data (default "auto")
    prompt_choice: Literal["random", "first", "last"] | None = None  # which phrasing of a prompt list (default random)
    caption_key: str | None = None  # the field of a shard's .json holding the caption (default "caption")
    instruction_key: str | None = None  # the same for an instruction (default "instruction")
    toyworld_size: int = 32  # toy image side
    toyworld_seed: int = 0
    toyworld_subject_fraction: float = 0.3  # instruct stage: share of subject-driven pairs
    # instruct stage: share of plain captions (no source image), so text-to-image is not forgotten (rest: edits)
    toyworld_caption_fraction: float = 0.0
    # weights of the caption kinds (metaqueries_core.toyworld.world.CAPTION_KINDS: placed, placed_many, count,
    # relation, pair), e.g. {relation: 2, placed: 1}; None: the world's natural mix (placed 2, count 1, relation 2,
    # pair 1)
    toyworld_caption_mix: dict[str, float] | None = None
    cache_latents: bool = False  # encode targets with the VAE once, before training (frozen VAE)
    latent_cache_dir: str | None = None  # None: OUTPUT_DIR/latent_cache; a shared folder lets runs reuse one cache

    def __post_init__(self) -> None:
        self.path, self.latent_cache_dir = expand_home(self.path), expand_home(self.latent_cache_dir)
        at_least("data.resolution", self.resolution, 1)
        at_least("data.toyworld_size", self.toyworld_size, 1)
        within("data.toyworld_seed", self.toyworld_seed, 0, MAX_SEED)
        given = given_beyond_default(self, FORMAT_OPTION_NAMES)
        if wrong := [name for name in given if name not in FORMAT_OPTIONS[self.kind]]:
            allowed = ", ".join(f"data.{n}" for n in FORMAT_OPTIONS[self.kind]) or "none of them"
            raise ValueError(
                f"{', '.join(f'data.{n}' for n in wrong)} is not an option of data.kind={self.kind!r} "
                f"(its format options: {allowed})"
            )
        if self.buckets is not None:
            validate_buckets([tuple(b) for b in self.buckets])
        shares = {
            "toyworld_subject_fraction": self.toyworld_subject_fraction,
            "toyworld_caption_fraction": self.toyworld_caption_fraction,
        }
        if any(not 0.0 <= v <= 1.0 for v in shares.values()) or sum(shares.values()) > 1.0:
            raise ValueError(f"data.{' + '.join(shares)} must be shares in [0, 1] adding up to at most 1, got {shares}")
        if self.toyworld_caption_mix is not None:
            check_caption_mix(self.toyworld_caption_mix)
        self._refuse_options_of_other_kinds()

    def _refuse_options_of_other_kinds(self) -> None:
        """The toy world makes its own images at its own size; files on disk have no toy-world settings."""
        if self.kind == "toyworld":
            ignored, instead = given_beyond_default(self, FILE_OPTIONS), "data.toyworld_size sets the image size"
        else:
            ignored, instead = given_beyond_default(self, TOYWORLD_OPTIONS), "they only shape the toy world"
        if ignored:
            raise ValueError(
                f"{', '.join(f'data.{n}' for n in ignored)} would be ignored with data.kind={self.kind!r} ({instead}); "
                "drop them or choose the data.kind they belong to"
            )


def check_caption_mix(mix: dict[str, float]) -> None:
    """Raise unless `mix` weighs known caption kinds with non-negative weights, not all zero."""
    if unknown := sorted(set(mix) - set(CAPTION_KINDS)):
        raise ValueError(f"caption mix: unknown kinds {unknown}; expected some of {list(CAPTION_KINDS)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"caption mix: weights must be >= 0 and not all 0, got {mix}")


@dataclass
class OptimSection:
    lr: float = 1e-4
    queries_lr: float | None = None  # None: lr
    decoder_lr: float | None = None  # None: lr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # only on trained matrices, never on norms, biases or the queries
    grad_clip: float = 0.5
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # queries and connector keep their initial values (LR 0) for this many first steps while a decoder trained from
    # scratch learns to read their output, then warm up; 0: all start together. A fresh decoder and head trained
    # together find the prompt-independent solution first (benchmarks/TOYWORLD.md)
    head_hold_steps: int = 0

    def __post_init__(self) -> None:
        above("optim.lr", self.lr, 0)
        at_least("optim.queries_lr", self.queries_lr, 0, " (0 keeps the queries as they start; null: optim.lr)")
        at_least("optim.decoder_lr", self.decoder_lr, 0, " (0 keeps the decoder as it starts; null: optim.lr)")
        for i, beta in enumerate(self.betas):
            within(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        at_least("optim.weight_decay", self.weight_decay, 0)
        at_least("optim.grad_clip", self.grad_clip, 0, " (0: no clipping)")
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        within("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, why=" (the share of optim.lr the cosine ends at)")
        at_least("optim.head_hold_steps", self.head_hold_steps, 0)


@dataclass
class TrainSection:
    stage: Literal["pretrain", "instruct"] = "pretrain"
    steps: int = 1000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, none on CPU
    gradient_checkpointing: bool = False
    prefix_cache: bool = True  # run the prompt once without autograd into the KV cache (same gradients, faster)
    seed: int = 0
    drop_caption: float = 0.1  # pretrain: empty caption; instruct: drop the instruction
    drop_both: float = 0.1  # instruct: drop caption and images
    drop_images: float = 0.1  # instruct: black images of the same size
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500  # 0: never
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle on the left", "two blue squares"])
    sample_steps: int = 20
    guidance: float = 4.5
    image_guidance: float = 1.5
    log_every: int = 10
    output_dir: str = "runs/default"
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False  # without resume: delete the checkpoints an earlier run left in output_dir (else an error)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    export_name: str = "metaquery.safetensors"

    def __post_init__(self) -> None:
        self.output_dir = expand_home(self.output_dir)
        if not self.output_dir.strip():
            raise ValueError("train.output_dir is empty: give the folder the run writes its checkpoints and export to")
        within("train.seed", self.seed, 0, MAX_SEED)
        if self.resume and self.overwrite:
            raise ValueError(
                "train.resume and train.overwrite are both true: resume continues the checkpoints that overwrite "
                "deletes; choose one"
            )
        for name in ("drop_caption", "drop_both", "drop_images"):
            within(f"train.{name}", getattr(self, name), 0.0, 1.0, why=" (a probability)")
        if self.drop_caption + self.drop_both + self.drop_images > 1.0:
            raise ValueError("train.drop_caption + drop_both + drop_images must not exceed 1")
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "sample_steps", "log_every"):
            at_least(f"train.{name}", getattr(self, name), 1)
        at_least("train.checkpoint_every", self.checkpoint_every, 0, " (0: only the final export)")
        at_least("train.sample_every", self.sample_every, 0, " (0: never)")
        for name in ("guidance", "image_guidance"):
            at_least(f"train.{name}", getattr(self, name), 0, " (1: no guidance)")
        if self.sample_every and not self.sample_prompts:
            raise ValueError("train.sample_prompts is empty while train.sample_every > 0: give prompts or set 0")
        name = self.export_name
        if not name.endswith(".safetensors") or name != Path(name).name or name.startswith("."):
            raise ValueError(
                f"train.export_name must be a file name ending in .safetensors (no folder; it is written into "
                f"train.output_dir), got {name!r}"
            )


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        if self.model.decoder_mode == "frozen" and self.optim.decoder_lr is not None:
            raise ValueError(
                "optim.decoder_lr is set but model.decoder_mode='frozen' trains no decoder; set model.decoder_mode "
                "(full or lora) or drop optim.decoder_lr"
            )
