"""The training pipeline's per-batch normalisation equals the transforms' own, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from threetowers.backbones.frozen import Preprocessing
from threetowers.cli import main
from threetowers.data.transforms import (
    PixelEvalTransform,
    PixelTrainTransform,
    eval_transform,
    train_transform,
)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (50, 80), (97, 41), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_pixel_transforms_then_normalise_equal_the_float_transforms():
    for pre in (
        Preprocessing(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="bicubic", crop_fraction=1.0),
        Preprocessing(40, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875),
    ):
        images = _images()
        pixels = torch.stack([PixelEvalTransform(pre)(image) for image in images])
        size = pre.image_size
        assert pixels.dtype == torch.uint8 and pixels.shape == (len(images), 3, size, size)
        expected = torch.stack([eval_transform(pre)(image) for image in images])
        assert torch.equal(pre.normalize_pixels(pixels), expected)

        crops = PixelTrainTransform(pre, scale=(0.5, 1.0))
        pixels = torch.stack([crops(im, np.random.default_rng(i)) for i, im in enumerate(images)])
        reference = train_transform(pre, scale=(0.5, 1.0))
        expected = torch.stack(
            [reference(im, np.random.default_rng(i)) for i, im in enumerate(images)]
        )
        assert torch.equal(pre.normalize_pixels(pixels), expected)


def test_ranks_over_unequal_shards_stop_each_epoch_at_the_same_batch(tmp_path, monkeypatch):
    from tests.helpers.images import picture
    from threetowers import build_model, distributed, load_config
    from threetowers.data import pipeline
    from threetowers.data.sources.loader import num_batches
    from threetowers.trainer.start import towers_of

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard, size in enumerate((24, 8, 16)):  # 2 ranks: one gets two shards, one gets one
        with wds.TarWriter(str(shards / f"train-{shard:06d}.tar")) as sink:
            for index in range(size):
                key = f"s{shard}-{index:03d}"
                sink.write({"__key__": key, "png": picture(index), "txt": b"a red square"})
    cfg = load_config(
        "tiny",
        [
            "model.mode=clip",
            f"data.train={shards}",
            "data.batch_size=8",
            "data.num_workers=0",
            "model.text.vocab_size=100",
        ],
    )
    opened = pipeline.open_data(cfg, tmp_path)
    data = pipeline.TrainingData(cfg, opened, towers_of(build_model(cfg)), progress=False)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for epoch in range(3):
        planned = [
            num_batches(data.pairs, batch_size=4, seed=0, epoch=epoch, rank=r, world_size=2)
            for r in range(2)
        ]
        got = []
        for rank in range(2):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            got.append(sum(1 for _ in data.batches(epoch, 0)))
            assert sum(1 for _ in data.batches(epoch, 1)) == min(planned) - 1  # resumed
        assert got == [min(planned)] * 2
        assert planned[0] != planned[1]


BAD_TABLES = {  # name -> (file, content, what the message must say)
    "jsonl_without_image": (
        "pairs.jsonl",
        '{"file": "a.png", "caption": "x"}\n' * 3,
        "not an object with an 'image' string",
    ),
    "jsonl_with_trailing_commas": (
        "pairs.jsonl",
        '{"image": "a.png", "caption": "x"},\n' * 3,
        "not valid JSON: Extra data",
    ),
    "json_array": (
        "pairs.jsonl",
        '[{"image": "a.png", "caption": "x"}, {"image": "a.png", "caption": "y"}]\n',
        "not an object with an 'image' string",
    ),
    "absolute_paths": (
        "pairs.csv",
        "image,caption\n/etc/a.png,x\n/etc/b.png,y\n",
        "path_outside_root",
    ),
}


@pytest.mark.parametrize("case", BAD_TABLES, ids=list(BAD_TABLES))
def test_a_table_with_no_usable_row_names_the_real_cause_first(tmp_path, capsys, case):
    name, content, cause = BAD_TABLES[case]
    (tmp_path / "a.png").write_bytes(b"never read")
    (tmp_path / name).write_text(content)
    argv = ["train", "tiny", f"data.train={tmp_path / name}", "model.mode=clip", "--quiet"]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" not in err and "Traceback" not in err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert line.startswith(
        f"threetowers train: error: data.train {tmp_path / name}: none of its "
    ), line
    assert cause in err


def test_a_csv_without_the_columns_points_at_the_config_keys(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,x\n")
    argv = ["train", "tiny", f"data.train={tmp_path / 'pairs.csv'}", "model.mode=clip"]
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "(name the image column with data.image_key=COLUMN)" in err
    assert "image_column=" not in err


def test_shards_without_a_usable_caption_say_where_captions_are_read(tmp_path, capsys):
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "png": b"x", "title": b"a caption elsewhere"})
    argv = ["train", "tiny", f"data.train={tmp_path / 's.tar'}", "model.mode=clip"]
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no sample of" in err and "name another with data.caption_key" in err


def test_the_tokenizer_trains_on_its_caption_sample_which_the_run_records(tmp_path, monkeypatch):
    from tests.helpers.shards import write_shards
    from threetowers import load_config
    from threetowers.data.pipeline import load_or_train_tokenizer
    from threetowers.data.sources.caption_sample import caption_sample
    from threetowers.data.sources.pairs import iter_captions, open_pairs
    from threetowers.data.tokenizer import CaptionTokenizer
    from threetowers.files.readback import read_json

    # What it is trained on, compared: tokenizers' BPE trainer breaks ties between equally
    # frequent merges by ids it assigns in hash order, so two trainings of these captions
    # (whose merges tie) differ, while the world's do not (tests/test_pinned_numbers.py).
    trained_on = []
    train = CaptionTokenizer.train.__func__

    def spied(cls, captions, vocab_size, context_length):
        trained_on.append(list(captions))
        return train(cls, captions, vocab_size, context_length)

    monkeypatch.setattr(CaptionTokenizer, "train", classmethod(spied))
    pairs = open_pairs(write_shards(tmp_path / "shards", [5, 7, 6, 8], captions_per_sample=2))
    cfg = load_config("tiny")
    tokenizer = load_or_train_tokenizer(cfg, tmp_path / "run", pairs)
    assert trained_on == [list(iter_captions(pairs))]  # every caption, as before the bound
    saved = CaptionTokenizer.load(tmp_path / "run", cfg.model.text.context_length)
    assert saved.digest() == tokenizer.digest()
    assert read_json(tmp_path / "run" / "tokenizer_sample.json") == {
        "bound": 1_000_000,
        "captions": 52,
        "shards": 4,
        "shards_read": 4,
        "every_caption": True,
    }
    bounded = load_config("tiny", overrides=["data.tokenizer_sample=9"])
    load_or_train_tokenizer(bounded, tmp_path / "bounded", pairs)
    assert trained_on[1] == caption_sample(pairs, 9).captions and len(trained_on[1]) == 9
    record = read_json(tmp_path / "bounded" / "tokenizer_sample.json")
    assert record["captions"] == 9 and record["shards_read"] < 4 and not record["every_caption"]
