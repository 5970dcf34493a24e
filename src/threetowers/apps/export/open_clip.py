"""A trained run as an OpenCLIP model folder, loaded with
``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer``.

The folder: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``), the weights as
``open_clip_model.safetensors`` (f and g with their heads W_f and W_g, the main pair's learned
scale and, for sigmoid runs, bias) and the caption tokenizer as a ``transformers`` folder.
The mapping is exact: tests/interop loads it in OpenCLIP itself and compares embeddings.

What OpenCLIP's own towers cannot compute exactly is refused before anything is written, each
reason naming its config key and the nearest setting that exports. Read off OpenCLIP 3.3:
its ViT always attends over a class token and projects without a bias; its text config has
no padding mask for bidirectional attention; its text towers pool one token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from threetowers.apps.export.tokenizer_folder import TOKENIZER_FILES, write_tokenizer_folder
from threetowers.backbones.trained_pair import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    open_clip_block_names,
)
from threetowers.config import Config
from threetowers.errors import UserError, listed
from threetowers.files.atomic import TMP_MARK, save_tensors, write_atomic
from threetowers.model.build import structure_of
from threetowers.model.objective import MAIN_TERM
from threetowers.model.three_towers import ThreeTowers
from threetowers.model.trained import TrainedRun, load_trained

# How far W_f's bias may miss the span of W_f's rows once folded into the final LayerNorm.
FOLD_TOLERANCE = 1e-6


class ExportError(UserError, ValueError):
    """A run that OpenCLIP cannot hold exactly: every reason, one per line."""


def refusals(cfg: Config, alpha: float | None = None) -> list[str]:
    """Why the run of ``cfg`` cannot be exported exactly (empty: it can)."""
    model, reasons = cfg.model, []
    structure = structure_of(model)
    if not (structure.trains_image_tower and structure.trains_text_tower):
        reasons.append(
            "model.mode lit: a frozen pretrained tower stands in for a trained one, and "
            "OpenCLIP's ViT and text Transformer cannot hold it; export a clip or 3t run"
        )
        return reasons
    if alpha is not None and alpha != 1.0:
        reasons.append(
            f"--alpha {alpha}: an OpenCLIP model holds f and g only, so the mix with the frozen "
            "towers has no place in it; export the deployed model (alpha 1, the default) and "
            f"get mixed vectors with `threetowers embed RUN --alpha {alpha}`"
        )
    if model.head != "linear":
        reasons.append(
            f"model.head {model.head}: OpenCLIP projects each tower with one matrix; the "
            "nearest exportable setting is model.head linear"
        )
    image, text = model.image, model.text
    if image.pool == "map":
        reasons.append(
            "model.image.pool map: OpenCLIP's attentional pooler is another module; the nearest "
            "exportable settings are model.image.pool cls, or gap with model.image.class_token "
            "true"
        )
    elif image.pool == "gap" and not image.class_token:
        reasons.append(
            "model.image.pool gap without a class token: OpenCLIP's ViT always attends over a "
            "class token, which would change every patch's features; train with "
            "model.image.class_token true (OpenCLIP's avg pooling) or model.image.pool cls"
        )
    if model.embed_dim > image.width:
        reasons.append(
            f"model.embed_dim {model.embed_dim} > model.image.width {image.width}: OpenCLIP's "
            "image projection has no bias, and W_f's bias folds into the final LayerNorm only "
            f"when embed_dim <= width; use model.embed_dim <= {image.width}"
        )
    if text.pool == "mean":
        reasons.append(
            "model.text.pool mean: OpenCLIP's text Transformer pools one token; the nearest "
            "exportable setting is model.text.pool eot with model.text.causal true"
        )
    if not text.causal:
        reasons.append(
            "model.text.causal false: OpenCLIP's text config has no padding mask for "
            "bidirectional attention, so padding would change the embedding; train with "
            "model.text.causal true and model.text.pool eot"
        )
    for key, tower in (("image", image), ("text", text)):
        if int(tower.width * tower.mlp_ratio) != round(tower.width * tower.mlp_ratio):
            reasons.append(
                f"model.{key}.mlp_ratio {tower.mlp_ratio}: OpenCLIP's MLP has "
                f"int(width * ratio) = {int(tower.width * tower.mlp_ratio)} units, this tower "
                f"{round(tower.width * tower.mlp_ratio)}; use a ratio with an integer "
                f"width * ratio"
            )
    if cfg.loss.weights.f_g == 0:
        reasons.append(
            f"loss.weights.{MAIN_TERM} 0: f and g were never trained as a pair, so there is no "
            "CLIP model to export; give the main term a positive weight"
        )
    return reasons


def _blocks(prefix: str, tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's pre-LN blocks in OpenCLIP's ResidualAttentionBlock names (the one mapping
    the frozen-pair loader reads back)."""
    ours = dict(tower.named_parameters())
    names = open_clip_block_names("", prefix, len(tower.encoder.blocks))
    return {theirs: ours[name] for name, theirs in names.items()}


def _folded_bias(head: torch.nn.Linear) -> torch.Tensor:
    """delta with W delta = b: added to the final LayerNorm's bias (every pooled vector gets
    it, cls or mean), it makes the bias-free ``pooled @ W.T`` equal ``W pooled + b``."""
    weight, bias = head.weight.double(), head.bias.double()
    delta = torch.linalg.lstsq(weight, bias.unsqueeze(1)).solution.squeeze(1)
    miss = (weight @ delta - bias).norm() / bias.norm().clamp_min(1e-12)
    if miss > FOLD_TOLERANCE:
        raise ExportError(
            f"W_f's bias is not in the span of its rows (relative miss {miss:.1e}), so it "
            "cannot fold into the final LayerNorm; OpenCLIP's image projection has no bias"
        )
    return delta.float()


def state_dict(model: ThreeTowers) -> dict[str, torch.Tensor]:
    """f, g, W_f, W_g and the main pair's scale (and bias) in OpenCLIP's CLIP names."""
    f, g = model.image_tower, model.text_tower
    head_f, head_g = model.heads["f"], model.heads["g"]
    positions = f.pos_embed[0].clone()
    # The patch embedding's bias (OpenCLIP's conv1 has none) is the same for every patch:
    # it moves into the patches' positions; the class token's row gets none.
    positions[1:] += f.patch_embed.bias
    state = {
        "visual.conv1.weight": f.patch_embed.weight,
        "visual.class_embedding": f.cls_token.reshape(-1),
        "visual.positional_embedding": positions,
        **_blocks("visual.", f),
        "visual.ln_post.weight": f.norm.weight,
        "visual.ln_post.bias": f.norm.bias + _folded_bias(head_f),
        "visual.proj": head_f.weight.T,
        "token_embedding.weight": g.token_embed.weight,
        "positional_embedding": g.pos_embed[0],
        **_blocks("", g),
        "ln_final.weight": g.norm.weight,
        "ln_final.bias": g.norm.bias,
        "text_projection.weight": head_g.weight,
        "text_projection.bias": head_g.bias,
        "logit_scale": model.loss_fn.scale(MAIN_TERM).log(),
    }
    if model.loss_fn.kind == "sigmoid":
        state["logit_bias"] = model.loss_fn.bias[model.loss_fn.temperature_of[MAIN_TERM]]
    return {key: value.detach().float().contiguous() for key, value in state.items()}


def open_clip_config(run: TrainedRun) -> dict:
    """``model_cfg`` and ``preprocess_cfg`` for OpenCLIP's CLIP class, plus what was exported."""
    cfg, model = run.cfg, run.model
    image, text = cfg.model.image, cfg.model.text
    pre = model.image_preprocessing
    if pre.crop_fraction != 1.0:  # f's eval view is built with 1.0 (model/build.py)
        raise ExportError(f"f's eval crop fraction is {pre.crop_fraction}; OpenCLIP crops none")
    model_cfg = {
        "embed_dim": cfg.model.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": image.image_size,
            "patch_size": image.patch_size,
            "width": image.width,
            "layers": image.depth,
            "head_width": image.width // image.heads,
            "mlp_ratio": image.mlp_ratio,
            "no_ln_pre": True,
            "pool_type": "tok" if image.pool == "cls" else "avg",
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.depth,
            "mlp_ratio": text.mlp_ratio,
            "pad_id": run.tokenizer.pad_id,
            # The end-of-text token is our last real token (the tokenizer keeps it through
            # truncation); OpenCLIP's "eos" pooling finds its first occurrence.
            "eos_id": run.tokenizer.eos_id,
            "pool_type": "eos",
            "proj_bias": True,
            # Any non-empty name: for a local-dir: model, OpenCLIP reads the tokenizer from
            # the model's folder.
            "hf_tokenizer_name": ".",
        },
    }
    if cfg.loss.kind == "sigmoid":
        model_cfg["init_logit_bias"] = cfg.loss.init_bias
    frozen = [tower.backbone for tower in cfg.model.frozen] if model.frozen else []
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": pre.image_size,
            "mode": "RGB",
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.resize,
            "resize_mode": "shortest",
        },
        "threetowers": {
            "run": str(run.run_dir),
            "step": run.step,
            "mode": cfg.model.mode,
            "fingerprint": run.fingerprint,
            "holds": "f and g with their heads W_f and W_g (alpha 1)",
            "not_held": (
                f"the frozen towers {frozen} and their heads: for the alpha mix use "
                "`threetowers embed RUN --alpha A`"
                if frozen
                else None
            ),
        },
    }


def export_open_clip(run_dir: str | Path, out: str | Path, alpha: float | None = None) -> dict:
    """Write ``run_dir``'s model as an OpenCLIP folder at ``out``; returns its config.
    Raises ExportError, listing every reason, for a run OpenCLIP cannot hold exactly."""
    run = load_trained(run_dir, uses_frozen=False)  # f and g only
    reasons = refusals(run.cfg, alpha)
    if reasons:
        raise ExportError(f"{run_dir} cannot be exported to OpenCLIP exactly:\n{listed(reasons)}")
    out = Path(out)
    config = open_clip_config(run)
    weights = state_dict(run.model)  # may still refuse (the bias fold): before writing
    refuse_others(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / OPEN_CLIP_WEIGHTS, weights)
    write_tokenizer_folder(run.tokenizer, out)
    write_atomic(out / OPEN_CLIP_CONFIG, json.dumps(config, indent=1))
    return config


# What an export writes: an earlier export, even a half-written one, may be written over.
EXPORT_FILES = (OPEN_CLIP_WEIGHTS, *TOKENIZER_FILES, OPEN_CLIP_CONFIG)


def refuse_others(out: Path) -> None:
    """Refuse an ``out`` that holds files an export does not write: it would write over some
    of them (another model's tokenizer.json, say) and leave a folder that is neither."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out={out} is a file; give --out a new or empty folder")
    others = sorted(
        p.name
        for p in (out.iterdir() if out.is_dir() else ())
        if p.name not in EXPORT_FILES and TMP_MARK not in p.name  # a killed export's
    )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ExportError(
            f"--out={out} holds files an OpenCLIP export does not write ({shown}); writing it "
            "there would mix two models' files. Give --out a new or empty folder"
        )
