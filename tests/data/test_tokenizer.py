"""Caption tokenizer: layout of the id tensors, training, saving and errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from threetowers.data.tokenizer import CaptionTokenizer, MemoisedEncoder
from threetowers.errors import UserError

CAPTIONS = [
    "a red cube to the left of a blue sphere.",
    "two small green cylinders on a wooden table",
    "a large yellow sphere behind the red cube",
    "three blue cubes, one of them small!",
    "the photo shows a purple cone next to an orange torus",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=300, context_length=12)


def test_special_tokens_have_fixed_ids(tokenizer):
    inner = tokenizer._tokenizer
    assert [inner.token_to_id(t) for t in ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]] == [0, 1, 2, 3]
    assert tokenizer.pad_id == 0 and 4 < tokenizer.vocab_size <= 300


def test_layout_is_bos_tokens_eos_then_padding(tokenizer):
    ids = tokenizer.encode(["a red cube", "two small green cylinders"])
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    for row in ids:
        length = int((row != 0).sum())
        assert row[0] == 1 and row[length - 1] == 2
        assert (row[length:] == 0).all() and (row[:length] != 0).all()
        assert not (row[1 : length - 1] == 2).any() and not (row[1:length] == 1).any()


def test_truncation_keeps_eos(tokenizer):
    row = tokenizer.encode([" ".join(CAPTIONS[:3])])[0]
    assert (row != 0).all() and row[0] == 1 and row[-1] == 2
    untruncated = tokenizer._tokenizer.encode(" ".join(CAPTIONS[:3]), add_special_tokens=False)
    assert row[1:-1].tolist() == untruncated.ids[:10]


def test_training_is_deterministic_across_processes(tmp_path):
    """Token ids must not depend on the process (a resumed run retrains nothing, but a
    colleague reproducing a run does)."""
    import subprocess
    import sys

    script = (
        "import sys; from threetowers.data.tokenizer import CaptionTokenizer as T; "
        f"T.train({CAPTIONS!r} * 3, 60, 12).save(sys.argv[1])"
    )
    outputs = []
    for run in range(2):
        path = tmp_path / f"tok{run}.json"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
        outputs.append(path.read_text())
    assert outputs[0] == outputs[1]


def test_empty_caption_is_bos_eos(tokenizer):
    ids = tokenizer.encode(["", "   \n"])
    assert ids.tolist() == [[1, 2] + [0] * 10] * 2


def test_round_trip_and_normalisation(tokenizer):
    text = "a red cube left of the blue sphere."
    # Punctuation is a word of its own to the pre-tokenizer, so it comes back spaced.
    assert tokenizer.decode(tokenizer.encode([text])[0]) == "a red cube left of the blue sphere ."
    assert torch.equal(tokenizer.encode(["A RED Cube"]), tokenizer.encode(["a red cube"]))
    # NFKC folds the "fi" ligature and full-width letters into plain ones.
    assert torch.equal(tokenizer.encode(["ﬁve ｃube"]), tokenizer.encode(["five cube"]))
    assert 3 in tokenizer.encode(["日本"])[0].tolist()  # unseen characters -> [UNK]
    assert tokenizer.decode(tokenizer.encode(["a cube", "a sphere"])) == ["a cube", "a sphere"]


def test_save_load_and_pickle_give_the_same_ids(tokenizer, tmp_path):
    file = tokenizer.save(tmp_path / "tok")
    assert file == tmp_path / "tok" / "tokenizer.json" and file.is_file()
    batch = CAPTIONS[:5] + ["", "unseen wordz here"]
    for loaded in (
        CaptionTokenizer.load(tmp_path / "tok", context_length=12),
        CaptionTokenizer.load(file, context_length=12),
        pickle.loads(pickle.dumps(tokenizer)),
    ):
        assert loaded.vocab_size == tokenizer.vocab_size
        assert torch.equal(loaded.encode(batch), tokenizer.encode(batch))
    longer = CaptionTokenizer.load(file, context_length=20).encode(batch)
    assert longer.shape == (7, 20) and torch.equal(longer[:, :5], tokenizer.encode(batch)[:, :5])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        CaptionTokenizer.load(tmp_path / "nothing.json", context_length=8)
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a Hugging Face tokenizers"):
        CaptionTokenizer.load(bogus, context_length=8)
    with pytest.raises(ValueError, match="too small"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=4, context_length=8)
    with pytest.raises(ValueError, match="vocab_size >= "):
        CaptionTokenizer.train(CAPTIONS, vocab_size=12, context_length=8)
    with pytest.raises(ValueError, match="at least 2"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=300, context_length=1)
    with pytest.raises(ValueError, match="no captions"):
        CaptionTokenizer.train(["", " "], vocab_size=300, context_length=8)


def test_memoised_encoder_gives_the_tokenizers_ids(tokenizer):
    # Batches repeat captions within and across calls, in new orders; ids must not change.
    memo = MemoisedEncoder(tokenizer)
    batches = [CAPTIONS[:7], CAPTIONS[3:][::-1], ["an unseen caption", *CAPTIONS[:2]], []]
    for batch in batches:
        got = memo(batch)
        assert got.dtype == torch.long
        assert torch.equal(got, tokenizer.encode(batch))
    assert len(memo.rows) == len(set(CAPTIONS)) + 1  # each distinct caption tokenised once


def test_a_tokenizer_the_user_gave_or_asked_for_fails_as_a_user_error(tmp_path):
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text("{}")
    with pytest.raises(UserError, match="not a Hugging Face tokenizers JSON file"):
        CaptionTokenizer.load(bogus, context_length=8)  # data.tokenizer
    with pytest.raises(UserError, match="vocab_size=4 is too small"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=4, context_length=8)  # model.text.vocab_size
