"""A frozen image-text pair trained by this project: from its run directory, or from the
folder ``threetowers export --format open_clip`` wrote of it.

Either way the pair is f followed by W_f and g followed by W_g, the embeddings the main term
compared (unnormalised), and that term's learned scale. The image side reads f's own eval
view; the text side tokenises captions with the run's caption tokenizer, as training and
evaluation do (its ids padded to a chunk's longest caption, which g masks out).

An OpenCLIP folder is read natively, without open_clip: its weights go back into this
project's own ``VisionTransformer`` / ``TextTransformer`` and linear heads, the export's
mapping inverted. The export moved the patch embedding's bias into the patches' positions
and folded W_f's bias into the final LayerNorm, so a zero patch bias and a zero head bias
give OpenCLIP's function exactly. Only what the export writes is read (ViT pooled ``tok``
or ``avg`` without ``ln_pre``; a causal text Transformer pooled at ``eos``, projected with a
bias); the captions go through the folder's ``tokenizer.json`` at the context length, the ids
OpenCLIP's ``get_tokenizer("local-dir:...")`` gives plain text (docs/export.md: its ftfy
clean-up may change captions holding ``&amp;`` or curly quotes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from threetowers.backbones.frozen import RESIZE_MODES, FrozenBackbone, Preprocessing
from threetowers.backbones.pair import FrozenPair
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.errors import UserError, listed
from threetowers.files.readback import read_json
from threetowers.model.objective import MAIN_TERM
from threetowers.towers.text import TextTransformer
from threetowers.towers.vit import VisionTransformer

PairKind = Literal["run", "open_clip"]
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_POOLS = {"tok": "cls", "avg": "gap"}  # OpenCLIP's ViT pooling -> ours
# What the export writes, and so all a folder may hold (other keys change the function).
OPEN_CLIP_KEYS = {
    "model_cfg": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_bias"},
    "vision_cfg": {
        "image_size",
        "patch_size",
        "width",
        "layers",
        "head_width",
        "mlp_ratio",
        "no_ln_pre",
        "pool_type",
    },
    "text_cfg": {
        "context_length",
        "vocab_size",
        "width",
        "heads",
        "layers",
        "mlp_ratio",
        "pad_id",
        "eos_id",
        "pool_type",
        "proj_bias",
        "hf_tokenizer_name",
    },
}
EXPORTED = "what `threetowers export --format open_clip` writes"


class TrainedPairError(UserError, ValueError):
    """A run or an OpenCLIP folder that holds no image-text pair this loader reads exactly."""


class Projected(nn.Module):
    """A trained tower followed by its head: the unnormalised embeddings, float32."""

    def __init__(self, tower: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(inputs)).float()


class TrainedText(FrozenTextEncoder):
    """Captions -> g followed by W_g, tokenised by the caption tokenizer g was trained with."""

    def __init__(self, text: Projected, tokenizer: CaptionTokenizer, dim: int, name: str):
        # A copy of the tokenizer's own settings (template, truncation at the context length);
        # the base class pads each chunk to its longest caption, which g masks out.
        rules = Tokenizer.from_str(tokenizer.to_json())
        super().__init__(
            text, rules, max_length=tokenizer.context_length, name=name, feature_dim=dim
        )

    def _features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(inputs["input_ids"])

    def _digest_settings(self) -> list:
        # g's attention and pooling are no weights; two towers may differ in them alone
        tower = self.model.tower
        return ["trained", tower.causal, tower.pool, tower.pad_id, self.tokenizer.to_str()]


def tower_pair(
    image: Projected,
    preprocessing: Preprocessing,
    text: Projected,
    tokenizer: CaptionTokenizer,
    embed_dim: int,
    scale: float,
    name: str,
) -> FrozenPair:
    """The frozen pair of trained towers whose heads end in ``embed_dim``."""
    image_side = FrozenBackbone(image, preprocessing, feature_dim=embed_dim, name=f"{name}-image")
    text_side = TrainedText(text, tokenizer, embed_dim, f"{name}-text")
    return FrozenPair(image_side, text_side, float(scale))


def pair_kind(path: str | Path) -> PairKind | None:
    """``"open_clip"`` for a folder with ``open_clip_config.json``, ``"run"`` for a run
    directory (``config.yaml`` and ``checkpoints/``) or one checkpoint of one, else None."""
    folder = Path(path)
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    if _run_dir(folder) is not None:
        return "run"
    return None


def _run_dir(folder: Path) -> Path | None:
    """The run directory of a run or of one of its checkpoints (``RUN/checkpoints/step_N``)."""
    if (folder / "meta.json").is_file() and folder.parent.name == "checkpoints":
        folder = folder.parent.parent
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        return folder
    return None


def load_run_pair(path: str | Path) -> FrozenPair:
    """f + W_f and g + W_g of a clip or 3t run (its latest valid checkpoint, or the
    checkpoint directory given), with f's eval view and the main term's learned scale."""
    from threetowers.config import load_config
    from threetowers.model.trained import load_trained

    folder = Path(path)
    run_dir = _run_dir(folder)
    if run_dir is None:
        raise TrainedPairError(
            f"{folder} is not a run directory (config.yaml and checkpoints/) nor a checkpoint "
            "of one; give the directory `threetowers train` wrote"
        )
    cfg = load_config(run_dir / "config.yaml")
    structure = cfg.model.structure()
    where = run_dir / "config.yaml"
    if not (structure.trains_image_tower and structure.trains_text_tower):
        raise TrainedPairError(
            f"{run_dir} is a lit run (model.mode lit in {where}): a frozen tower stands in "
            "for a trained one, so its sides are no pair trained together; name a clip or 3t "
            "run, or use its frozen tower itself"
        )
    if cfg.loss.weights.f_g == 0:
        raise TrainedPairError(
            f"{run_dir} trained f and g apart (loss.weights.{MAIN_TERM} 0 in {where}), so its "
            "W_f and W_g share no space; name a run whose main term has a positive weight"
        )
    run = load_trained(folder, uses_frozen=False)  # f and g, not its frozen towers
    model = run.model
    return tower_pair(
        Projected(model.image_tower, model.heads["f"]),
        model.image_preprocessing,
        Projected(model.text_tower, model.heads["g"]),
        run.tokenizer,
        model.embed_dim,
        model.loss_fn.scale(MAIN_TERM).item(),
        f"pair-{run_dir.name}",
    )


def load_open_clip_pair(path: str | Path) -> FrozenPair:
    """The pair in a folder ``threetowers export --format open_clip`` wrote, read natively
    (no open_clip): OpenCLIP's embeddings of it, and ``exp(logit_scale)``."""
    folder = Path(path)
    config_path = folder / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise TrainedPairError(
            f"{folder} has no {OPEN_CLIP_CONFIG}; give a folder written by `threetowers export "
            "--format open_clip`"
        )
    config = read_json(config_path, fix="export the run again")
    reasons = _open_clip_refusals(config)
    if reasons:
        raise TrainedPairError(
            f"{config_path} is not {EXPORTED}, the one OpenCLIP form a frozen pair reads "
            f"natively:\n{listed(reasons)}\nExport the run again, or save another OpenCLIP "
            "model as a transformers CLIP folder (save_pretrained) and name that folder"
        )
    model_cfg = config["model_cfg"]
    try:
        image, text_side, embed_dim = _open_clip_towers(model_cfg)
    except (ValueError, TypeError) as error:  # shapes the towers' own checks refuse
        raise TrainedPairError(f"{config_path}: {error}; export the run again") from None
    weights_path = folder / OPEN_CLIP_WEIGHTS
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as error:
        raise TrainedPairError(
            f"{weights_path} cannot be read ({error}); export the run again"
        ) from None
    _load_open_clip_weights(image, text_side, weights, weights_path)
    context_length = model_cfg["text_cfg"]["context_length"]
    tokenizer = CaptionTokenizer.load(folder / "tokenizer.json", context_length)
    return tower_pair(
        image,
        _open_clip_preprocessing(config["preprocess_cfg"]),
        text_side,
        tokenizer,
        embed_dim,
        math.exp(float(weights["logit_scale"])),
        f"pair-{folder.name}",
    )


def _open_clip_towers(model_cfg: dict) -> tuple[Projected, Projected, int]:
    """Our towers and linear heads in the shapes of OpenCLIP's ``model_cfg``."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    embed_dim = int(model_cfg["embed_dim"])
    image_tower = VisionTransformer(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        width=vision["width"],
        depth=vision["layers"],
        heads=vision["width"] // vision["head_width"],
        mlp_ratio=vision["mlp_ratio"],
        pool=OPEN_CLIP_POOLS[vision["pool_type"]],
        class_token=True,  # OpenCLIP's ViT always has one
    )
    text_tower = TextTransformer(
        vocab_size=text["vocab_size"],
        context_length=text["context_length"],
        width=text["width"],
        depth=text["layers"],
        heads=text["heads"],
        mlp_ratio=text["mlp_ratio"],
        causal=True,
        pool="eot",  # the last real token: [EOS], where OpenCLIP's eos pooling reads
        pad_id=text["pad_id"],
    )
    image = Projected(image_tower, nn.Linear(vision["width"], embed_dim))
    text_side = Projected(text_tower, nn.Linear(text["width"], embed_dim))
    return image, text_side, embed_dim


def _open_clip_refusals(config: dict) -> list[str]:
    """Why ``config`` is not an architecture the export writes (empty: it is)."""
    model_cfg, preprocess = config.get("model_cfg"), config.get("preprocess_cfg")
    if not isinstance(model_cfg, dict) or not isinstance(preprocess, dict):
        return ["it lacks model_cfg or preprocess_cfg (OpenCLIP's two sections)"]
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        return ["model_cfg lacks vision_cfg or text_cfg"]
    reasons = []
    for section, settings in (("model_cfg", model_cfg), ("vision_cfg", vision), ("text_cfg", text)):
        extra = sorted(set(settings) - OPEN_CLIP_KEYS[section])
        if extra:
            reasons.append(f"{section} sets {', '.join(extra)}, which the export never writes")
        needed = OPEN_CLIP_KEYS[section] - {"init_logit_bias"}
        missing = sorted(needed - set(settings))
        if missing:
            reasons.append(f"{section} lacks {', '.join(missing)}")
    if reasons:
        return reasons
    fixed = [
        ("model_cfg.quick_gelu", model_cfg["quick_gelu"], False),
        ("vision_cfg.no_ln_pre", vision["no_ln_pre"], True),
        ("text_cfg.pool_type", text["pool_type"], "eos"),
        ("text_cfg.proj_bias", text["proj_bias"], True),
        ("text_cfg.pad_id", text["pad_id"], CaptionTokenizer.pad_id),
        ("text_cfg.eos_id", text["eos_id"], CaptionTokenizer.eos_id),
        ("preprocess_cfg.resize_mode", preprocess.get("resize_mode"), "shortest"),
    ]
    for key, value, wanted in fixed:
        if value != wanted:
            reasons.append(f"{key} is {value!r}; the export writes {wanted!r}")
    if vision["pool_type"] not in OPEN_CLIP_POOLS:
        reasons.append(
            f"vision_cfg.pool_type is {vision['pool_type']!r}; the export writes one of "
            f"{sorted(OPEN_CLIP_POOLS)}"
        )
    if preprocess.get("interpolation") not in RESIZE_MODES:
        reasons.append(
            f"preprocess_cfg.interpolation is {preprocess.get('interpolation')!r}; the export "
            f"writes one of {list(RESIZE_MODES)}"
        )
    if preprocess.get("size") != vision["image_size"]:
        reasons.append(
            f"preprocess_cfg.size {preprocess.get('size')!r} is not vision_cfg.image_size "
            f"{vision['image_size']!r}"
        )
    return reasons


def _open_clip_preprocessing(preprocess: dict) -> Preprocessing:
    """OpenCLIP's eval transform (shortest side resized to the size, centre crop)."""
    return Preprocessing(
        int(preprocess["size"]),
        tuple(preprocess["mean"]),
        tuple(preprocess["std"]),
        resize=preprocess["interpolation"],
        crop_fraction=1.0,
    )


def open_clip_block_names(ours: str, theirs: str, depth: int) -> dict[str, str]:
    """Our Transformer blocks' parameter names -> OpenCLIP's (ResidualAttentionBlock). Our
    qkv rows are (q, k, v) with heads contiguous, the layout of MultiheadAttention's in_proj."""
    parts = {
        "norm1": "ln_1",
        "attn.out": "attn.out_proj",
        "norm2": "ln_2",
        "mlp.0": "mlp.c_fc",
        "mlp.2": "mlp.c_proj",
    }
    names = {}
    for i in range(depth):
        block, resblock = f"{ours}encoder.blocks.{i}.", f"{theirs}transformer.resblocks.{i}."
        for part, their_part in parts.items():
            for kind in ("weight", "bias"):
                names[f"{block}{part}.{kind}"] = f"{resblock}{their_part}.{kind}"
        for kind in ("weight", "bias"):
            names[f"{block}attn.qkv.{kind}"] = f"{resblock}attn.in_proj_{kind}"
    return names


def _load_open_clip_weights(
    image: Projected, text: Projected, weights: dict[str, torch.Tensor], where: Path
) -> None:
    """The export's state dict back in our towers and heads, every tensor used."""
    f, g = image.tower, text.tower
    depth_f, depth_g = len(f.encoder.blocks), len(g.encoder.blocks)
    names = {
        "tower.patch_embed.weight": "visual.conv1.weight",
        "tower.cls_token": "visual.class_embedding",
        "tower.pos_embed": "visual.positional_embedding",
        **open_clip_block_names("tower.", "visual.", depth_f),
        "tower.norm.weight": "visual.ln_post.weight",
        "tower.norm.bias": "visual.ln_post.bias",
        "head.weight": "visual.proj",
    }
    text_names = {
        "tower.token_embed.weight": "token_embedding.weight",
        "tower.pos_embed": "positional_embedding",
        **open_clip_block_names("tower.", "", depth_g),
        "tower.norm.weight": "ln_final.weight",
        "tower.norm.bias": "ln_final.bias",
        "head.weight": "text_projection.weight",
        "head.bias": "text_projection.bias",
    }
    used = set(names.values()) | set(text_names.values()) | {"logit_scale", "logit_bias"}
    missing = sorted((used - {"logit_bias"}) - set(weights))
    unexpected = sorted(set(weights) - used)
    if missing or unexpected:
        raise TrainedPairError(
            f"{where} does not hold {EXPORTED} for its {OPEN_CLIP_CONFIG} (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); export the run again"
        )
    image_state = {ours: weights[theirs] for ours, theirs in names.items()}
    # OpenCLIP keeps the class token and positions unbatched, and projects x @ proj
    image_state["tower.cls_token"] = image_state["tower.cls_token"].reshape(1, 1, -1)
    image_state["tower.pos_embed"] = image_state["tower.pos_embed"].unsqueeze(0)
    image_state["head.weight"] = image_state["head.weight"].T.contiguous()
    # The export moved these biases into the positions and the final LayerNorm
    image_state["tower.patch_embed.bias"] = torch.zeros_like(f.patch_embed.bias)
    image_state["head.bias"] = torch.zeros_like(image.head.bias)
    text_state = {ours: weights[theirs] for ours, theirs in text_names.items()}
    text_state["tower.pos_embed"] = text_state["tower.pos_embed"].unsqueeze(0)
    for module, state in ((image, image_state), (text, text_state)):
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:  # shapes that contradict the config
            raise TrainedPairError(
                f"{where} does not fit its {OPEN_CLIP_CONFIG} ({str(error).splitlines()[-1]}); "
                "export the run again"
            ) from None
