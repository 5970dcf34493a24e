"""Caption tokenizer: a BPE vocabulary trained with Hugging Face ``tokenizers``.

Every caption becomes ``[BOS] tokens [EOS]`` right-padded with ``[PAD]`` (id 0), which is
what the text tower expects: padding masked out, at least one real token, end-of-text last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from threetowers.errors import UserError
from threetowers.files.atomic import write_atomic

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
WORD_END = "</w>"  # marks a word's last piece, so decoding restores the spaces
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # their ids are their positions: 0, 1, 2, 3


class TokenizerError(UserError, ValueError):
    """A caption tokenizer that cannot be trained or loaded as asked (its file, vocab_size,
    context_length or captions)."""


FILENAME = "tokenizer.json"


def _json_path(path: str | Path) -> Path:
    path = Path(path)
    return path / FILENAME if path.is_dir() or not path.suffix else path


def _canonical_ids(tokenizer: Tokenizer) -> Tokenizer:
    """Renumber a trained BPE vocabulary: specials, then the alphabet sorted, then merge
    products in merge order. The trainer numbers equally frequent characters in hash order,
    which differs between processes; tokenization depends on the merges only, so this makes
    token ids a function of the captions alone."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    merged = ["".join(pair) for pair in model["merges"]]
    produced = set(merged)
    alphabet = sorted(t for t in model["vocab"] if t not in produced and t not in SPECIAL_TOKENS)
    order = list(SPECIAL_TOKENS) + alphabet + list(dict.fromkeys(merged))
    model["vocab"] = {token: i for i, token in enumerate(order)}
    for added in spec.get("added_tokens", []):
        added["id"] = model["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


class CaptionTokenizer:
    """Fixed-length caption encoder. Build with :meth:`train` or :meth:`load`."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        if context_length < 2:
            raise TokenizerError(
                f"context_length must be at least 2 (room for [BOS] and [EOS]), got "
                f"{context_length}"
            )
        for expected, token in enumerate(SPECIAL_TOKENS):
            found = tokenizer.token_to_id(token)
            if found != expected:
                raise TokenizerError(
                    f"tokenizer has {token} at id {found}, expected {expected}; caption "
                    f"tokenizers need {', '.join(SPECIAL_TOKENS)} at ids 0..3 (train one with "
                    "CaptionTokenizer.train)"
                )
        self.context_length = int(context_length)
        self._tokenizer = tokenizer
        self._configure()

    def _configure(self) -> None:
        # Truncation in `tokenizers` reserves room for the template's special tokens, so
        # [EOS] survives truncation and always ends the real tokens.
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            special_tokens=[(BOS, self.bos_id), (EOS, self.eos_id)],
        )
        self._tokenizer.enable_truncation(max_length=self.context_length)
        self._tokenizer.enable_padding(
            direction="right", pad_id=self.pad_id, pad_token=PAD, length=self.context_length
        )

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, context_length: int
    ) -> CaptionTokenizer:
        """Learn a BPE vocabulary of at most ``vocab_size`` entries (specials included).

        Text is NFKC-normalised and lower-cased, then split on whitespace and punctuation.
        BPE rather than WordPiece: the WordPiece trainer breaks ties differently in every
        process, so a resumed run (or a colleague) would get other token ids.
        """
        if vocab_size <= len(SPECIAL_TOKENS):
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small: {len(SPECIAL_TOKENS)} ids are taken by "
                f"{', '.join(SPECIAL_TOKENS)}"
            )
        captions = [str(caption) for caption in captions]
        if not any(caption.strip() for caption in captions):
            raise TokenizerError("cannot train a tokenizer on no captions (all were empty)")
        tokenizer = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=WORD_END))
        tokenizer.decoder = decoders.BPEDecoder(suffix=WORD_END)
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.BpeTrainer(
            end_of_word_suffix=WORD_END,
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        tokenizer.train_from_iterator(captions, trainer=trainer)
        tokenizer = _canonical_ids(tokenizer)
        learned = tokenizer.get_vocab_size()
        if learned > vocab_size:
            # The trainer keeps every character it saw, even past vocab_size; a text tower
            # sized to vocab_size would then index out of range.
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small for these captions: their characters "
                f"alone need {learned} entries; use vocab_size >= {learned}"
            )
        return cls(tokenizer, context_length)

    @classmethod
    def load(cls, path: str | Path, context_length: int) -> CaptionTokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one) written by :meth:`save`."""
        file = _json_path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:
            raise TokenizerError(
                f"{file} is not a Hugging Face tokenizers JSON file: {error}"
            ) from error
        return cls(tokenizer, context_length)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a ``.json`` file), whole
        or not at all."""
        file = _json_path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, self._tokenizer.to_str(pretty=True))
        return file

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def digest(self) -> str:
        """sha256 of the tokenizer itself (not of a file's formatting): what a checkpoint
        records as ``tokenizer_sha256``."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, captions: Sequence[str] | str) -> torch.Tensor:
        """(B, context_length) int64 token ids: [BOS] tokens [EOS], then padding (0)."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        for caption in captions:
            if not isinstance(caption, str):
                raise TypeError(f"captions must be strings, got {type(caption).__name__}")
        if not captions:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        encodings = self._tokenizer.encode_batch(captions)
        return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Text of one id sequence (or a list of texts for a 2-D batch); specials dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], list):
            return self._tokenizer.decode_batch(ids, skip_special_tokens=True)
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __call__(self, captions: Sequence[str] | str) -> torch.Tensor:
        return self.encode(captions)

    def __repr__(self) -> str:
        return (
            f"CaptionTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
        )


class MemoisedEncoder:
    """``tokenizer.encode`` that tokenises each distinct caption once. A run meets every
    caption again each epoch, and on two cores tokenising a batch costs ~5% of a small
    model's step. The memo grows with the distinct captions (~300 bytes each), so it is
    for data held in memory anyway (``data.preload``), not for streamed shards."""

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer
        self.rows: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        if not captions:
            return self.tokenizer.encode([])
        new = [caption for caption in dict.fromkeys(captions) if caption not in self.rows]
        if new:
            ids = self.tokenizer.encode(new).numpy().astype(np.int32)
            self.rows.update(zip(new, ids, strict=True))
        return torch.from_numpy(np.stack([self.rows[caption] for caption in captions])).long()
