"""apps/export/tokenizer_folder.py: the caption tokenizer as a folder that transformers'
AutoTokenizer loads, giving exactly CaptionTokenizer.encode's ids (as OpenCLIP's HFTokenizer
calls it), its special tokens at our ids."""

from __future__ import annotations

import pytest
import torch

from threetowers.apps.export.tokenizer_folder import write_tokenizer_folder
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.project.world.spec import WorldSpec, render


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    captions = [c for i in range(60) for c in render(WorldSpec(), "val", i)[1]["captions"]]
    return CaptionTokenizer.train(captions, 300, 24)


def test_the_tokenizer_folder_gives_our_ids_through_transformers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    captions = [c for i in range(60) for c in render(WorldSpec(), "val", i)[1]["captions"]]
    write_tokenizer_folder(tokenizer, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = captions + [
        "A RED Star beside a blue ring.",
        "ﬁve small crosses, left of centre",
        "a " + "very " * 40 + "long caption",
    ]
    ids = theirs(texts, padding="max_length", max_length=24, truncation=True).input_ids
    assert torch.equal(torch.tensor(ids), tokenizer.encode(texts))
    assert ids[-1][-1] == tokenizer.eos_id  # truncated, and still ends with end-of-text


def test_the_folders_special_tokens_and_length_are_the_tokenizers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer_folder(tokenizer, tmp_path / "new" / "folder")  # made when missing
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "new" / "folder")
    assert theirs.model_max_length == tokenizer.context_length
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
    )
    assert theirs.unk_token_id == tokenizer.unk_id
    assert theirs.padding_side == "right" and theirs.truncation_side == "right"
    # decoding back: the folder's tokenizer and ours read the same ids as the same text
    ids = tokenizer.encode(["a red star beside a blue ring"])[0]
    assert theirs.decode(ids, skip_special_tokens=True).replace(" ", "") == (
        tokenizer.decode(ids).replace(" ", "")
    )


def test_the_folder_reloads_as_the_same_caption_tokenizer(tokenizer, tmp_path):
    write_tokenizer_folder(tokenizer, tmp_path)
    again = CaptionTokenizer.load(tmp_path / "tokenizer.json", tokenizer.context_length)
    assert again.digest() == tokenizer.digest()
