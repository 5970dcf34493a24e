"""eval.val_data: the validation loss and retrieval on held-out pairs of one's own data."""

from __future__ import annotations

import json

import torch

from tests.helpers.runs import clip_run_config
from threetowers.cli import main
from threetowers.data.sources.pairs import iter_pairs
from threetowers.data.transforms import eval_transform
from threetowers.model.trained import load_trained
from threetowers.trainer.loop import train


def test_validation_scores_are_the_models_and_show_progress(world_dir, tmp_path):  # noqa: F811
    val = world_dir / "pairs" / "val-000000.tar"
    cfg, _ = clip_run_config(
        world_dir, tmp_path, f"eval.val_data={val}", "train.steps=30", "eval.every=3"
    )
    run = train(cfg, tmp_path / "run", progress=False)
    scores = json.loads((run / "eval.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval"]["val_loss"] for r in records if "eval" in r]
    assert len(losses) == 10 and losses[-1] == scores["val_loss"] < losses[0]

    # retrieval, recomputed from the trained model directly: every caption a positive
    trained = load_trained(run)
    model, pairs = trained.model, list(iter_pairs(val))
    view = eval_transform(model.image_preprocessing)
    with torch.no_grad():
        images = model.encode_image(torch.stack([view(p.image) for p in pairs])).double()
        captions = [c for p in pairs for c in p.captions]
        texts = model.encode_text(trained.tokenizer.encode(captions)).double()
    owner = torch.tensor([i for i, p in enumerate(pairs) for _ in p.captions])
    scores_it = images @ texts.T
    best_caption = scores_it.argmax(dim=1)
    i2t = 100 * (owner[best_caption] == torch.arange(len(pairs))).double().mean()
    t2i = 100 * (scores_it.argmax(dim=0) == owner).double().mean()
    assert abs(scores["val_i2t_R@1"] - float(i2t)) < 1e-6
    assert abs(scores["val_t2i_R@1"] - float(t2i)) < 1e-6


def test_a_run_with_nothing_to_evaluate_says_so_once(world_dir, tmp_path, capsys):  # noqa: F811
    shards = world_dir / "pairs" / "train-{000000..000003}.tar"
    _, config = clip_run_config(world_dir, tmp_path, f"data.train={shards}", "train.steps=2")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("no evaluation set: eval.retrieval, eval.zeroshot and eval.val_data") == 1
