"""The caption tokenizer as a folder that ``transformers.AutoTokenizer`` loads.

Written by hand rather than through ``transformers`` (an optional extra here): the folder is
the tokenizer's own ``tokenizer.json`` and a small ``tokenizer_config.json`` naming the fast
tokenizer class, its special tokens and its context length. Called with
``padding="max_length", max_length=context_length, truncation=True`` (as OpenCLIP's
HFTokenizer calls it), it gives exactly ``CaptionTokenizer.encode``'s ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from threetowers.data.tokenizer import BOS, EOS, PAD, UNK, CaptionTokenizer
from threetowers.files.atomic import write_atomic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer_folder(tokenizer: CaptionTokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_FILES[0])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": tokenizer.context_length,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    write_atomic(out / TOKENIZER_FILES[1], json.dumps(config, indent=1))
