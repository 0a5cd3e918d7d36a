"""One TOML schema for every subcommand: `[models] [pipeline] [dedup] [train]`.

Loaded into frozen dataclasses (nanoGPT style: a comment per field says why). The CLI only overrides
fields; checkpoints and reports store `asdict(config)`. `--config NAME|PATH`: an existing path is a
TOML file; anything else names a preset shipped in `formats/presets/` (`tiny`, `sd3`).

Model locations may be hub ids, local paths, URLs (SSCD) or `tiny://NAME`, which the launcher
resolves to the cached tiny models (`flowcurate.models.tiny.resolve_tiny`), building them once if needed.

This module lives in `formats` because it is the one package every other package may import.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TINY_SCHEME = "tiny://"


@dataclass(frozen=True)
class ModelsConfig:
    # diffusers StableDiffusion3Pipeline folder or hub id: vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/
    sd3: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    # git revision for hub ids (None: the default branch); recorded in the conditioning record
    sd3_revision: str | None = None
    # SSCD TorchScript file: path or URL (loading TorchScript runs its code: use files you trust)
    sscd: str = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
    # expected sha256 of the SSCD file (checked after download; the released files' digests are built in)
    sscd_sha256: str | None = None
    # any transformers image-text-to-text VLM (AutoProcessor + AutoModelForImageTextToText); "": no
    # captioning: no VLM loads and the original captions are kept (the synthetic variant repeats them)
    captioner: str = "llava-hf/llava-1.5-7b-hf"
    captioner_revision: str | None = None
    # remote code runs arbitrary Python from the hub: off unless the user asks for it
    trust_remote_code: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    # square training resolution (pixels) the AE sees after resize + centre crop
    resolution: int = 256
    # decompression-bomb guard: images with more pixels are rejected as too_many_pixels
    max_pixels: int = 89_478_485
    # images whose shorter side is smaller are rejected as too_small
    min_size: int = 64
    # long side / short side above this is rejected as bad_aspect
    max_aspect: float = 3.0
    # fraction of kept keys (chosen by a stable hash) written to val shards
    val_fraction: float = 0.01
    # samples per output shard
    shard_size: int = 1000
    # prompt given to the captioner (as a chat message when the processor has a chat template)
    caption_prompt: str = "Describe this image in detail."
    caption_max_new_tokens: int = 77
    # T5 sequence length; SD3 paper: 77 (diffusers' pipeline default is 256)
    t5_max_length: int = 77
    # dtype of precomputed arrays in the shards (the paper stored text embeddings in half precision)
    store_dtype: str = "float16"
    # encoder batch sizes (per worker)
    batch_size: int = 16
    caption_batch_size: int = 8
    # crop to the nearest aspect bucket of about resolution^2 pixels instead of the centred square
    aspect_buckets: bool = False
    # where the model stages run: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # dtypes the models run in (float32 | float16 | bfloat16); the shards store `store_dtype`
    ae_dtype: str = "float32"
    text_encoder_dtype: str = "float32"
    # model-based filters after validation (SD3 filtered by aesthetics and NSFW), each a table:
    #   filters = [{name = "aesthetic", clip = "openai/clip-vit-large-patch14", head = "/w/aesthetic.safetensors",
    #               min = 5.0}, {name = "nsfw", clip = "...", head = "/w/nsfw.safetensors", max = 0.5},
    #              {name = "clip", kind = "clip_score", clip = "openai/clip-vit-large-patch14", min = 0.2}]
    # rejected rows read filtered:<name> (pipeline/filters.py); every score is a manifest column
    # score_<name>; kind = "clip_score" is the built-in image-caption cosine of a full CLIP (no head; it
    # may have no bound, then it only records), also recorded for the synthetic caption (score_<name>_syn).
    # Heads are the user's, or fitted with `flowcurate filters fit` (a linear probe)
    filters: tuple = ()
    # one copy of the captioner and of the encoders per machine, shared by its SDK worker processes
    # (Beam's multi_process_shared): for models too big to load once per process (7B VLMs, T5-XXL)
    share_models: bool = False
    # prompts encoded into the conditioning record, for the trainer's sample grids
    validation_prompts: tuple[str, ...] = ("a red circle above a blue square", "a photo of a cat")
    # what each kept image becomes in the shards: "sd3" (SD3 latents + the three text encodings and the
    # conditioning record: what `flowcurate train` reads), "images" (img2dataset's WebDataset layout: the
    # training view as {key}.jpg or .png, {key}.txt, {key}.json, for any other trainer), or both in the
    # same samples. Without "sd3" no autoencoder or text encoder loads and no conditioning record exists
    outputs: tuple[str, ...] = ("sd3",)
    # the training view's encoding in "images" outputs: "jpg" (lossy, small) or "png" (exact pixels)
    image_format: str = "jpg"
    jpeg_quality: int = 95
    # "images" outputs also carry the input's own bytes as {key}.original.{jpg|png|webp|...}
    keep_original: bool = False
    # what the inputs are: "t2i" (images with captions -> text-to-image shards) or "edit" (InstructPix2Pix
    # triplets: a source image, an edited image and an instruction -> editing shards, formats/edit_shards.py;
    # no captioning, the instruction is the text; SSCD dedup on the edited images)
    task: str = "t2i"
    # edit triplets: the source image, edited image and instruction as Parquet columns (the public
    # InstructPix2Pix data's names) or as tar member names ({key}.original_image.jpg,
    # {key}.edited_image.png, {key}.edit_prompt.txt)
    edit_source: str = "original_image"
    edit_target: str = "edited_image"
    edit_instruction: str = "edit_prompt"

    OUTPUTS: ClassVar[tuple[str, ...]] = ("sd3", "images")
    TASKS: ClassVar[tuple[str, ...]] = ("t2i", "edit")

    def __post_init__(self):
        if not self.outputs or len(set(self.outputs)) != len(self.outputs) or set(self.outputs) - set(self.OUTPUTS):
            raise ConfigError(f"[pipeline] outputs must be a non-empty list of {list(self.OUTPUTS)} without "
                              f"repeats, got {list(self.outputs)}")
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"[pipeline] image_format must be \"jpg\" or \"png\", got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"[pipeline] jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.task not in self.TASKS:
            raise ConfigError(f"[pipeline] task must be one of {list(self.TASKS)}, got {self.task!r}")
        if self.task == "edit":
            if tuple(self.outputs) != ("sd3",):
                raise ConfigError("[pipeline] task = \"edit\" writes editing shards: outputs must be [\"sd3\"], "
                                  f"got {list(self.outputs)}")
            names = (self.edit_source, self.edit_target, self.edit_instruction)
            if len(set(names)) != 3 or not all(names):
                raise ConfigError("[pipeline] edit_source, edit_target and edit_instruction must be three different "
                                  f"non-empty names, got {list(names)}")


@dataclass(frozen=True)
class DedupConfig:
    # cosine similarity above which two SSCD descriptors are near-duplicates (SD3 App. E.2: 0.5)
    threshold: float = 0.5
    # remove near-duplicates (SSCD); false: exact-pixel duplicates only (`flowcurate run`; the ablation
    # that shows what near-duplicate removal buys, SD3 App. E)
    near: bool = True
    # k-means clusters: "auto" (exact search up to 20k items, 4M on a GPU, else about 4 sqrt(N)) or a number
    clusters: str = "auto"
    # nearest centroids each item may join (more: higher recall, more search time); measured at 1M with
    # k = 4 sqrt(N): top-8 with margin 0.1 recalls ~99 % of planted pairs above cosine 0.8 (BENCHMARKS.md)
    assign: int = 8
    # a further centroid is used only when its cosine is within this margin of the nearest one
    assign_margin: float = 0.1
    # exact all-pairs search (100 % recall; blockwise upper triangle) instead of k-means cells
    exact: bool = False
    # rows per block in blockwise search (memory: block_rows^2 float32 per worker thread)
    block_rows: int = 2048
    # k-means iterations and training sample size (items chosen by key hash)
    kmeans_iters: int = 10
    kmeans_sample: int = 100_000
    # k-means implementation for `flowcurate dedup`: "auto" (torch on the GPU when the search runs there,
    # else FAISS), "faiss", "torch"; the Beam pipeline's near-dup stage always trains with FAISS
    kmeans: str = "auto"
    # SSCD preprocessing: square resize, ImageNet mean/std (SSCD README)
    sscd_size: int = 320
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # keep priority: "pixels" (more pixels first, then key) or "key"
    priority: str = "pixels"
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    # MM-DiT size from flowcurate.models.mmdit's registry
    model: str = "d2"
    # the global batch: N ranks each take batch_size / N
    batch_size: int = 8
    # gradient accumulation: each rank's batch runs as this many micro-batches of batch / N (less memory,
    # the same gradient: each micro-batch loss is scaled by 1/N); DDP syncs on the last one only
    grad_accum: int = 1
    # how ranks share the shards: "auto" (shards when every rank and loader worker gets one, else global),
    # "global" (every rank reads the one stream: equal to one process), "shards" (disjoint shards per
    # rank) or "resampled" (shards drawn with replacement); see trainer/data.py
    split: str = "auto"
    # samples in the seeded shuffle buffer of each loader worker (0: shard order)
    shuffle_buffer: int = 256
    lr: float = 1e-4
    # AdamW eps; SD3 used 1e-15 with QK-norm in bf16
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    # after warm-up: "constant" (DiT, SD3) or "cosine" (decays to 0 at max_steps: short runs, overfit checks)
    lr_schedule: str = "constant"
    max_steps: int = 100_000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # timestep density: logit-normal(m, s) (SD3's best: m=0, s=1)
    timestep_density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # resolution-dependent timestep shift alpha (SD3 §5.3.2: 3.0 at 1024^2), a number or "auto":
    # alpha = sqrt(m / n), m = latent pixels of the training samples, n = latent pixels at
    # shift_base_resolution^2, i.e. training side / base side for square images (1024^2 over 256^2
    # gives 4.0; SD3 chose 3.0 by human preference). "auto" resolves at launch from the shards' first
    # training sample and the resolved number is what checkpoints record (trainer/init.py).
    shift: float | str = 3.0
    # image side, in pixels, at which "auto" gives shift 1.0 (SD3 pretrained at 256^2 with no shift)
    shift_base_resolution: int = 256
    # each text encoder dropped to zeros independently (SD3 App. B.3: 0.464, 0.464^3 ~ 10 % unconditional)
    text_drop_prob: float = 0.464
    # probability of the original (vs synthetic) caption (SD3 §5.2.2: 50/50)
    orig_caption_prob: float = 0.5
    # classifier-free guidance scale and Euler steps for sample grids
    cfg_scale: float = 5.0
    sample_steps: int = 28
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 1000
    log_every: int = 50
    seed: int = 0
    # bf16 autocast where the device supports it
    mixed_precision: bool = True

    # fields that take the string "auto" besides their type's values
    AUTO: ClassVar[frozenset[str]] = frozenset({"shift"})

    def __post_init__(self):
        if isinstance(self.shift, str) and self.shift != "auto":
            raise ConfigError(f"[train] shift must be a number or \"auto\", got {self.shift!r}")
        if self.shift_base_resolution <= 0:
            raise ConfigError(f"[train] shift_base_resolution must be positive, got {self.shift_base_resolution}")


@dataclass(frozen=True)
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # where the config came from (preset name or path), for reports
    source: str = "defaults"


_SECTIONS = {"models": ModelsConfig, "pipeline": PipelineConfig, "dedup": DedupConfig, "train": TrainConfig}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def resolve_device(device: str) -> str:
    """A config's or a flag's device: "auto" -> "cuda" when torch sees a GPU, else "cpu"; any other
    name as given. Resolve where the model loads (on a Beam worker: that worker's own GPU, if any)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("flowcurate.formats.presets").iterdir()
                  if p.name.endswith(".toml"))


def _section(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif value == "auto" and name in getattr(cls, "AUTO", ()):
            pass
        elif default is not None and not isinstance(value, type(default)):
            also = ' or "auto"' if name in getattr(cls, "AUTO", ()) else ""
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}{also}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: dict[str, Any], source: str = "dict") -> Config:
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    parts = {name: _section(cls, data.get(name, {}), f"{source}[{name}]") for name, cls in _SECTIONS.items()}
    return Config(**parts, source=source)


def load_config(name_or_path: str | Path = "tiny") -> Config:
    """An existing path is read as TOML; anything else names a preset (`tiny`, `sd3`)."""
    path = Path(name_or_path)
    if path.is_file():
        text, source = path.read_text(), str(path.resolve())
    else:
        if str(name_or_path) not in preset_names():
            raise ConfigError(f"--config {name_or_path!r} is neither a file nor a preset ({', '.join(preset_names())})")
        text = resources.files("flowcurate.formats.presets").joinpath(f"{name_or_path}.toml").read_text()
        source = f"preset:{name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from e
    return from_dict(data, source)


def override(cfg: Config, section: str, **values: Any) -> Config:
    """A copy of `cfg` with fields of one section replaced (the CLI's flags); None values are ignored."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return cfg
    sub = _section(_SECTIONS[section], {**dataclasses.asdict(getattr(cfg, section)), **values}, f"override[{section}]")
    return dataclasses.replace(cfg, **{section: sub})


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
