"""Structured, validated configs: YAML files or named presets plus dotted ``key=value`` overrides.

Pydantic models give types, ranges and unknown-key rejection; this module turns every failure
into one ``ConfigError`` that names each bad key, what is wrong and how to fix it. YAML is
parsed with guards: duplicate keys, deep nesting and alias bombs are refused before any work.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from threetowers.backbones.registry import BACKBONES, BACKBONES_NEEDING_PATH, TEXT_BACKBONES
from threetowers.errors import UserError

PRESETS_DIR = Path(__file__).parent / "presets"

# Far beyond any real config (a few levels deep, a few hundred values), yet small enough that
# a hostile one is refused while parsing instead of exhausting the stack or memory later.
MAX_DEPTH = 64
MAX_VALUES = 100_000
_TOO_DEEP = (
    f"nested more than {MAX_DEPTH} levels deep, aliases expanded (a config is a few levels "
    "deep); flatten it"
)
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Error messages show at most this much of a wrong value.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120


class ConfigError(UserError, ValueError):
    """A config the user wrote (or overrode) is invalid; the message says where and how to fix."""


class Section(BaseModel):
    # inf and nan pass range checks such as gt=0 (inf > 0), then poison a run much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ImageTowerConfig(Section):
    image_size: int = Field(64, gt=0)
    patch_size: int = Field(8, gt=0)
    width: int = Field(192, gt=0)
    depth: int = Field(6, gt=0)
    heads: int = Field(3, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    pool: Literal["cls", "gap", "map"] = "gap"
    # None: a class token for cls pooling only; true with gap: OpenCLIP's avg pooling (the
    # token attends, the mean leaves it out), the gap tower that `export` can write
    class_token: bool | None = None

    @model_validator(mode="after")
    def _shapes_fit(self) -> ImageTowerConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        mismatched = self.class_token is not None and self.class_token != (self.pool == "cls")
        if mismatched and self.pool != "gap":
            raise ValueError(
                f"class_token {self.class_token} does not go with pool {self.pool!r}: cls "
                "pooling needs the class token, map pooling has none; only gap takes either"
            )
        return self


class TextTowerConfig(Section):
    vocab_size: int = Field(8192, gt=1)
    context_length: int = Field(32, gt=0)
    width: int = Field(192, gt=0)
    depth: int = Field(4, gt=0)
    heads: int = Field(3, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    causal: bool = False
    pool: Literal["eot", "first", "mean"] = "mean"
    pad_id: int = Field(0, ge=0)
    length_buckets: int = Field(8, ge=1)  # CPU only: run batches in length buckets (1: off)

    @model_validator(mode="after")
    def _consistent(self) -> TextTowerConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pad_id >= self.vocab_size:
            raise ValueError(
                f"pad_id {self.pad_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if self.causal and self.pool == "first":
            raise ValueError(
                "pool 'first' with causal attention sees only the first token; "
                "use pool 'eot' or 'mean', or set causal false"
            )
        return self


class FrozenTowerConfig(Section):
    """One frozen pretrained tower k: its backbone, what the backbone needs, W_k, its weight."""

    # Unique; names the tower's heads (W_k, W_f->k as "f<name>", W_g->k as "g<name>"), its
    # loss terms, metric keys, caches and logs. "h" is the name of the model.third shorthand.
    name: str = Field("h", pattern=r"^[a-z][a-z0-9]{0,15}$")
    backbone: str = "efficientnet_lite0"
    path: str | None = None
    pool: Literal["auto", "cls", "pooler", "mean"] = "auto"
    head: Literal["linear", "mlp", "identity"] = "linear"
    # Input size; None: the backbone's own. Convolutional backbones accept smaller inputs,
    # which cost quadratically less (EfficientNet-Lite0: 224 px native).
    image_size: int | None = Field(None, gt=0)
    # Weight of both alignment terms with this tower (3t); None: loss.weights.fh_h / gh_h.
    weight: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _known(self) -> FrozenTowerConfig:
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}"
            )
        if self.backbone in BACKBONES_NEEDING_PATH and not self.path:
            raise ValueError(f"backbone {self.backbone!r} needs a path (e.g. model.third.path=...)")
        if self.backbone in TEXT_BACKBONES and self.image_size is not None:
            raise ValueError(
                f"backbone {self.backbone!r} reads captions: image_size does not apply (unset it)"
            )
        return self


class ModelConfig(Section):
    mode: Literal["clip", "lit", "3t"] = "3t"
    embed_dim: int = Field(128, gt=0)
    head: Literal["linear", "mlp"] = "linear"
    share_alignment_heads: bool = False
    image: ImageTowerConfig = ImageTowerConfig()
    text: TextTowerConfig = TextTowerConfig()
    # One frozen tower (named "h"), the shorthand of a one-item model.frozen.
    third: FrozenTowerConfig | None = FrozenTowerConfig()
    # The frozen towers, as a list; when given, it replaces model.third.
    frozen: list[FrozenTowerConfig] | None = None

    @model_validator(mode="before")
    @classmethod
    def _the_list_replaces_the_shorthand(cls, data: Any) -> Any:
        # A preset's model.third stays in place under an override of model.frozen: the list,
        # when given, is the towers (`threetowers config` shows third: null).
        if isinstance(data, dict) and data.get("frozen") is not None:
            data = {**data, "third": None}
        return data

    @property
    def frozen_towers(self) -> list[FrozenTowerConfig]:
        """The frozen towers, in order: model.frozen, or model.third as a one-item list."""
        if self.frozen is not None:
            return list(self.frozen)
        return [self.third] if self.third is not None else []

    @model_validator(mode="after")
    def _mode_has_its_towers(self) -> ModelConfig:
        towers = self.frozen_towers
        if self.mode in ("lit", "3t") and not towers:
            raise ValueError(
                f"mode {self.mode!r} needs a frozen tower; set model.third.backbone "
                "(e.g. efficientnet_lite0), list towers under model.frozen, or use mode 'clip'"
            )
        if self.mode == "lit" and len(towers) > 1:
            raise ValueError(
                f"mode 'lit' locks one frozen tower as the image tower; model.frozen lists "
                f"{len(towers)} ({[t.name for t in towers]}): keep one, or use mode '3t'"
            )
        names = [t.name for t in towers]
        derived = [n for name in names for n in (name, f"f{name}", f"g{name}")]
        clashes = sorted({n for n in derived if derived.count(n) > 1} | ({"f", "g"} & set(names)))
        if clashes:
            raise ValueError(
                f"frozen tower names {names} clash: {clashes} would name two things (tower k's "
                "heads are k, fk and gk, and f, g are the trained towers); rename them"
            )
        return self


class TermWeights(Section):
    """Weights of the 3T terms; the objective is their weighted mean. Weight 0 drops a term."""

    f_g: float = Field(1.0, ge=0)
    fh_h: float = Field(1.0, ge=0)
    gh_h: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> TermWeights:
        if self.f_g + self.fh_h + self.gh_h == 0:
            raise ValueError("all term weights are 0; at least one must be positive")
        return self


class LossConfig(Section):
    kind: Literal["softmax", "sigmoid"] = "softmax"
    shared_temperature: bool = False
    init_scale: float | None = Field(None, gt=0)  # None: 10 for both kinds (big_vision, SigLIP)
    max_scale: float = Field(100.0, gt=0)
    init_bias: float = -10.0  # sigmoid only
    weights: TermWeights = TermWeights()
    alignment: Literal["contrastive", "l2"] = "contrastive"
    # >0: contrastive terms computed this many rows at a time, exactly (same loss and
    # gradients) in O(B·block_size) memory instead of O(B²); 0: the plain B x B logits.
    block_size: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _scale_in_range(self) -> LossConfig:
        if self.init_scale is not None and self.init_scale > self.max_scale:
            raise ValueError(f"init_scale {self.init_scale} exceeds max_scale {self.max_scale}")
        return self


class WorldConfig(Section):
    """The embedded image-caption world, generated on first use (project/world/generate.py)."""

    dir: str = "worlds/default"
    seed: int = 0
    image_size: int = Field(64, gt=7)
    train_pairs: int = Field(20000, gt=0)
    val_pairs: int = Field(1000, gt=0)
    retrieval_test: int = Field(1000, gt=0)
    retrieval_val: int = Field(500, gt=0)
    captions_per_image: int = Field(5, gt=0)
    zeroshot_per_class: int = Field(100, gt=0)
    zeroshot_val_per_class: int = Field(50, gt=0)
    pretrain_objects_per_class: int = Field(1500, gt=0)
    pretrain_scenes_per_class: int = Field(600, gt=0)
    shard_size: int = Field(2000, gt=0)
    workers: int = Field(2, gt=0)


class TrainSource(Section):
    """One of several training sources (``data.train`` as a list)."""

    source: str  # anything data.train accepts alone
    weight: float = Field(1.0, gt=0)  # its share of the samples drawn (data.resampled)
    name: str | None = None  # names its metrics (data/source/NAME/samples); default: position


class DataConfig(Section):
    # pairs: a CSV/TSV/JSONL file, .tar or .parquet shards (a directory or pattern), several
    # as a list of {source, weight, name} or OpenCLIP's 'A::B' (weights: train_weights 'W1::W2')
    train: str | list[TrainSource] | None = None
    train_weights: str | float | None = None
    # draw shards with replacement, in proportion to the sources' weights (webdataset's
    # resampling): an epoch is one pass's worth of samples, not every sample once
    resampled: bool = False
    # Where each sample's image and captions are: a table's column, a JSONL key, a shard's
    # member extension ("jpg;png") or, for captions, a field of its .json member. None: image
    # and caption (or captions) in tables; the usual image members and .txt in shards.
    image_key: str | None = None
    caption_key: str | None = None
    world: WorldConfig = WorldConfig()
    tokenizer: str | None = None  # tokenizer.json; None: train a BPE on the training captions
    batch_size: int = Field(256, gt=0)
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(2000, ge=1)
    augment: bool = True  # random resized crops for the image tower f (h never sees augmentation)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    # precompute h's features once and reuse them (h is never augmented), for the training
    # data and for the benchmark images
    cache: bool = True
    cache_dir: str = "~/.cache/threetowers/features"
    # how the training features are stored: float16 halves the disk and the reads; on the
    # pinned runs it moves the losses by under 4e-5 relative (tests/test_pinned_numbers.py).
    # Evaluation's are always float32.
    cache_dtype: Literal["float16", "float32"] = "float16"
    # decode f's view of each image once into cache_dir and train from memory (needs
    # augment false); batches then come from a seeded permutation instead of shard streams.
    # The benchmark images' views and pretrain's images are decoded once there too.
    preload: bool = False
    # Bad samples (corrupt images, missing files, unusable captions, malformed rows) are
    # skipped and counted; above this fraction of the samples visited, the run stops. Clean
    # datasets have far under 1%; more means something systematic (a wrong image root, a
    # truncated download) that should be fixed rather than trained around. 1: never stop.
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # Image paths in CSV/JSONL tables may be absolute or climb out of the table's folder
    # ("..") only when this is set: a data file must not make the loader read elsewhere.
    allow_absolute_paths: bool = False

    def train_sources(self) -> list[TrainSource] | None:
        """``train`` as a list of named sources (None: the embedded world)."""
        if self.train is None:
            return None
        if isinstance(self.train, list):
            items = self.train
        else:
            paths = self.train.split("::")
            weights = str(self.train_weights or "::".join(["1"] * len(paths))).split("::")
            items = [
                TrainSource(source=p, weight=float(w)) for p, w in zip(paths, weights, strict=True)
            ]
        return [
            item.model_copy(update={"name": item.name or str(position)})
            for position, item in enumerate(items)
        ]

    @model_validator(mode="after")
    def _sources_consistent(self) -> DataConfig:
        if self.train_weights is not None:
            if not isinstance(self.train, str) or "::" not in self.train:
                raise ValueError("train_weights goes with data.train='A::B' (one weight each)")
            paths, weights = self.train.split("::"), str(self.train_weights).split("::")
            if len(weights) != len(paths) or not all(_positive(w) for w in weights):
                raise ValueError(
                    f"train_weights needs {len(paths)} positive numbers 'W1::W2...', one per "
                    f"source, got {self.train_weights!r}"
                )
        sources = self.train_sources() or []
        names = [item.name for item in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"train: source names must differ, got {names}")
        if len({item.weight for item in sources}) > 1 and not self.resampled:
            raise ValueError(
                "train: weights draw samples with replacement; set data.resampled=true (or "
                "give every source the same weight to read each sample once per epoch)"
            )
        if self.resampled and self.preload:
            raise ValueError("resampled and preload exclude each other: preload reads rows")
        return self

    @model_validator(mode="after")
    def _crop_scale_in_range(self) -> DataConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class EvalConfig(Section):
    """Benchmarks; left empty with the embedded world, its own sets are used."""

    # Karpathy-split JSON (dataset_flickr30k.json, ...), or several by name (the first is the
    # primary set; another's metrics carry its name: i2t_NAME_R@1)
    retrieval: str | dict[str, str] | None = None
    # The folder its entries' filepath/filename are relative to; None: the JSON's folder, or
    # its flickr30k-images/ subfolder when the images are there
    retrieval_images: str | None = None
    retrieval_split: str = "test"
    zeroshot: dict[str, str] = {}  # name -> class-folder root (classnames.txt, templates.txt)
    zeroshot_split: str | None = "test"
    fewshot_shots: int = Field(10, ge=0)  # per class, drawn from the class folder's val split
    alpha_sweep: bool = True
    # Held-out pairs of your own data (anything data.train accepts alone): the validation
    # loss and retrieval on them at every evaluation (val_loss, val_i2t_R@1, ...)
    val_data: str | None = None
    every: int = Field(0, ge=0)  # steps between evaluations; 0: only at the end
    batch_size: int = Field(256, gt=0)


class TrainConfig(Section):
    steps: int = Field(1000, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast is for GPUs; slow on CPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    # A step with a non-finite loss or gradient is skipped (no update); this many in a row
    # stop the run. Skipping changes no weight, so a streak over different batches means the
    # state or the settings are broken, not one batch.
    max_bad_steps: int = Field(10, gt=0)
    log_every: int = Field(10, gt=0)
    run_dir: str = "runs/default"
    # A new run starts from another run's trained weights (those whose names and shapes fit):
    # a run directory (its latest checkpoint) or one checkpoint (RUN/checkpoints/step_N).
    init_from: str | None = None
    # The train.steps a run was continued from, in order (a continuation records them): the
    # lr schedule restarts at each, over the steps that continuation added.
    continued_from: list[PositiveInt] = []

    @model_validator(mode="after")
    def _continued_before_the_end(self) -> TrainConfig:
        ends = [*self.continued_from, self.steps]
        if any(earlier >= later for earlier, later in zip(ends, ends[1:], strict=False)):
            raise ValueError(
                f"continued_from must be increasing steps below steps={self.steps}, got "
                f"{self.continued_from}; leave it out: a continuation records it"
            )
        return self


class PretrainConfig(Section):
    """Supervised pretraining of a classifier that later serves as a third tower."""

    data: str | None = None  # class folders with train/ and val/; None: the world's set below
    world_set: Literal["objects", "scenes"] = "objects"
    architecture: Literal["cnn", "vit"] = "cnn"
    cnn_widths: list[PositiveInt] = Field([16, 32, 64, 128], min_length=1)
    vit: ImageTowerConfig = ImageTowerConfig()
    image_size: int = Field(64, gt=0)
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    num_workers: int = Field(1, ge=0)
    out: str = "runs/pretrain/classifier.safetensors"


class ReproduceConfig(Section):
    """``threetowers reproduce``: which settings, how many seeds, and the --quick sizes."""

    settings: list[Literal["matched", "mismatched", "imagenet"]] = [
        "matched",
        "mismatched",
        "imagenet",
    ]
    seeds: int = Field(3, gt=0)
    quick_steps: int = Field(100, gt=0)  # train.steps under --quick (one seed)
    quick_pretrain_steps: int = Field(100, gt=0)  # pretrain.steps under --quick
    # runs side by side, each on its share of the cores (1: one after another, here)
    workers: int = Field(2, ge=1)
    # the axes --experiment scaling trains (one alone: a third of the runs or less)
    scaling_axes: list[Literal["pairs", "towers", "third"]] = ["pairs", "towers", "third"]

    @model_validator(mode="after")
    def _distinct_lists(self) -> ReproduceConfig:
        for name in ("settings", "scaling_axes"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct and not empty, got {values}")
        return self


class Config(Section):
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    pretrain: PretrainConfig = PretrainConfig()
    reproduce: ReproduceConfig = ReproduceConfig()


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A YAML file, a preset name (``tiny``, ``b16``, ...) or None (defaults), then overrides."""
    raw = _read_source(source) if source is not None else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw, origin=str(source) if source is not None else "defaults")


def refuse_repeated_keys(overrides: list[str]) -> None:
    """A key given twice on the command line: the shell expanded an unquoted brace pattern
    (``data.train=/data/{000000..000331}.tar`` becomes 332 arguments, the last one winning),
    or a mistake; either way the run would not train on what the user named."""
    seen: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            seen.setdefault(key.strip(), []).append(value)
    for key, values in seen.items():
        if len(values) > 1:
            shown = ", ".join(f"{key}={value}" for value in values[:2])
            raise ConfigError(
                f"{key} is given {len(values)} times on the command line ({shown}"
                f"{', ...' if len(values) > 2 else ''}); give it once. An unquoted brace "
                "pattern is expanded by the shell into one argument per file: quote it, e.g. "
                f"'{key}=/data/cc3m/{{000000..000331}}.tar'"
            )


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, origin)) from None


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def _read_source(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.exists() and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {str(source)!r} is neither a file nor a preset; presets: {preset_names()}"
        )
    try:
        raw = _parse_yaml(path.read_text(), str(path))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.mode=clip)")
    try:
        value = _parse_yaml(text, f"override {key.strip()}")
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


class _GuardedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys, deep nesting and alias bombs.

    Aliases share one parsed node but expand when the config is validated or printed, so the
    limits apply to the expanded document; ``measured`` holds each node's expanded size.
    """

    def __init__(self, text: str, origin: str) -> None:
        super().__init__(text)
        self.origin = origin
        self.depth = 0
        self.measured: dict[yaml.Node, tuple[int, int]] = {}  # node -> (values, levels)

    def refuse(self, mark: yaml.Mark, problem: str) -> NoReturn:
        raise ConfigError(f"{self.origin}, line {mark.line + 1}: {problem}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self.measured:  # its anchor is still open: the value contains itself
                self.refuse(event.start_mark, f"alias *{event.anchor} is inside its own value")
            if self.depth + self.measured[node][1] > MAX_DEPTH:
                self.refuse(event.start_mark, _TOO_DEEP)
            return node
        # PyYAML composes recursively: stop long before Python's recursion limit
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.refuse(event.start_mark, _TOO_DEEP)
        node = super().compose_node(parent, index)
        self.depth -= 1
        children = []
        if isinstance(node, yaml.MappingNode):
            self.check_keys(node)
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        values = 1 + sum(self.measured[child][0] for child in children)
        if values > MAX_VALUES:
            self.refuse(
                event.start_mark,
                f"this value holds over {MAX_VALUES:,} values once its aliases (*name) are "
                "expanded; a config needs far fewer: write the values out, or nest fewer aliases",
            )
        levels = 1 + max((self.measured[child][1] for child in children), default=0)
        self.measured[node] = values, levels
        return node

    def check_keys(self, node: yaml.MappingNode) -> None:
        """A key given twice in one mapping: YAML would keep the last one silently."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # merge keys (<<) may repeat, and the keys they merge in are meant to be overridden
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in lines:
                self.refuse(
                    key_node.start_mark,
                    f"key {_SHORT.repr(key)} is given twice (first on line {lines[key]}); "
                    "keep one: the last would silently replace the first",
                )
            lines[key] = key_node.start_mark.line + 1


def _parse_yaml(text: str, origin: str) -> Any:
    """One YAML document a user wrote, through the guards; ``origin`` names it in errors."""
    loader = _GuardedLoader(text, origin)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _describe(error: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_suggestion(problem['loc'])}")
        elif problem["type"] in ("value_error", "assertion_error"):
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}")
        else:
            lines.append(f"  {where}: {problem['msg']} (got {_SHORT.repr(problem.get('input'))})")
    return "\n".join(lines)


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds: itself, or inside ``X | None``, ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [s for arg in getattr(annotation, "__args__", ()) for s in _sections_in(arg)]


def _suggestion(loc: tuple) -> str:
    """Name the valid keys of the section holding an unknown key, closest first."""
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (model.frozen.0)
            continue
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        candidates = _sections_in(annotation)
        if not candidates:
            return ""
        section = candidates[0]
    valid = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} valid keys: {', '.join(valid)}"
