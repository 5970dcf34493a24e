"""trainer/accumulation.py: the gradients of micro-batches equal the whole batch's (float64),
for clip, lit and 3t, softmax and sigmoid, blocked and plain, with a frozen image and a frozen
text tower, in one process and with 2 gloo ranks; a run's logged losses equal without it, and
with and without activation checkpointing."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import threetowers as tt
from tests.conftest import tiny_backbone, tiny_batch, tiny_config
from threetowers import build_model, distributed
from threetowers.model.three_towers import batch_embeddings
from threetowers.trainer.accumulation import backward_in_micro_batches, micro_batches
from threetowers.trainer.step import _distributed_data_parallel

BATCH = 8
CAPTIONS = [f"a photo of thing {i} on the left" if i % 2 else f"thing {i}" for i in range(BATCH)]
TOWERS = {  # the frozen towers of each case: an image tower a, a text tower t
    "clip": None,
    "lit_image": "[{name: a}]",
    "lit_text": "[{name: t, backbone: minilm}]",
    "3t": "[{name: a}, {name: t, backbone: minilm}]",
}
CASES = list(itertools.product(TOWERS, ["softmax", "sigmoid"], [0, 3]))


def model_of(case: str, kind: str, block: int, text_encoder):
    mode = case.split("_")[0]
    overrides = [f"loss.kind={kind}", f"loss.block_size={block}"]
    if TOWERS[case]:
        overrides.append(f"model.frozen={TOWERS[case]}")
    frozen = {"a": tiny_backbone(), "t": text_encoder}
    names = {"a", "t"} if case == "3t" else {"t"} if case == "lit_text" else {"a"}
    torch.manual_seed(0)
    cfg = tiny_config(mode, *overrides)
    model = build_model(cfg, frozen={n: frozen[n] for n in names} if TOWERS[case] else None)
    model.double()
    if "t" in model.frozen:  # its features are given, as its cache gives them; it runs float32
        model.frozen["t"].float()
    return model


def batch(model, rows: slice = slice(None)) -> dict:
    """The batch's rows ``rows``; a text tower's features as its cache gives them (the
    encoder runs in float32), in float64."""
    images, tokens = tiny_batch(BATCH)
    tokens = tokens[:, : int((tokens != 0).sum(1).max())]
    out = {"images": images.double()[rows], "tokens": tokens[rows], "captions": CAPTIONS[rows]}
    if "t" in model.frozen:
        out["frozen_features"] = {"t": model.frozen["t"](CAPTIONS).double()[rows]}
    return out


def whole(model, forward, tensors, counts=None):
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch_embeddings(model, tensors, forward), counts)
    loss.backward()
    return loss.detach(), grads_of(model)


def micro(model, forward, tensors, size, counts=None):
    model.zero_grad(set_to_none=True)
    counts = counts or [len(tensors["tokens"])]
    loss, _ = backward_in_micro_batches(model, forward, tensors, counts, size, nullcontext)
    distributed.average_gradients(model.loss_fn.parameters())
    return loss.detach(), grads_of(model)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, expected) -> None:
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == expected_grads.keys() and len(grads) > 4
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("rows", "counts", "size", "expected"),
    [
        (8, [8], 3, [2, 3, 3]),  # near-equal parts of at most 3 rows
        (8, [8], 8, [8]),
        (4, [4, 3], 3, [2, 2]),  # ranks with 4 and 3 rows both make 2 passes
        (3, [4, 3], 3, [1, 2]),
        (1, [1, 7], 2, [0, 0, 0, 1]),  # fewer rows than passes: some passes are empty
    ],
)
def test_every_rank_makes_as_many_passes_as_the_rank_with_most_rows(rows, counts, size, expected):
    parts = micro_batches(rows, counts, size)
    assert [part.stop - part.start for part in parts] == expected
    assert parts[0].start == 0 and parts[-1].stop == rows
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))


@pytest.mark.parametrize(("case", "kind", "block"), CASES)
def test_micro_batches_give_the_whole_batchs_gradients(case, kind, block, tiny_text_encoder):
    model = model_of(case, kind, block, tiny_text_encoder)
    expected = whole(model, model, batch(model))
    for size in (1, 3, 5):  # uneven last micro-batches
        assert_same(micro(model, model, batch(model), size), expected)


def test_a_uint8_batch_is_normalised_a_micro_batch_at_a_time(tiny_text_encoder):
    """Views that came uint8 (f's and a live frozen tower's) are normalised per micro-batch,
    in both passes, never all at once, and the gradients are those of the batch normalised
    whole; the frozen tower runs a micro-batch at a time too."""
    model = model_of("3t", "softmax", 0, tiny_text_encoder)
    floats = batch(model)
    pixels = (floats["images"] * 40 + 128).round().clamp(0, 255).to(torch.uint8)
    seen = []

    def normalise(piece: dict) -> dict:
        seen.append(len(piece["images"]))
        piece["images"] = (piece["images"].double() - 128) / 40
        piece["frozen_images"] = {"a": (piece["frozen_images"]["a"].double() - 100) / 50}
        return piece

    uint8 = dict(floats, images=pixels, frozen_images={"a": pixels.flip(-1)})
    expected = whole(
        model, model, normalise(dict(uint8, frozen_images=dict(uint8["frozen_images"])))
    )
    seen.clear()
    model.zero_grad(set_to_none=True)
    loss, _ = backward_in_micro_batches(model, model, uint8, [BATCH], 3, nullcontext, normalise)
    assert_same((loss.detach(), grads_of(model)), expected)
    assert seen == [2, 3, 3, 2, 3, 3]  # each micro-batch, in the first pass and the second
    assert uint8["images"].dtype == torch.uint8  # the batch itself stays as it came


def test_the_towers_randomness_replays_in_the_second_pass(tiny_text_encoder):
    """With dropout in f, the pass with a graph draws each micro-batch's masks again, so the
    gradients are those of the embeddings the loss was taken on: as if each micro-batch were
    embedded with a graph, in turn, from the same seed."""
    model = model_of("clip", "softmax", 0, tiny_text_encoder).train()
    model.heads["f"] = torch.nn.Sequential(torch.nn.Dropout(0.3), model.heads["f"])
    torch.manual_seed(7)
    got = micro(model, model, batch(model), 3)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    tensors = batch(model)
    parts = [slice(start, start + 3) for start in range(0, BATCH, 3)]
    pieces = [model(tensors["images"][part], tensors["tokens"][part]) for part in parts]
    out = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
    loss, _ = model.loss(out)
    loss.backward()
    assert_same(got, (loss.detach(), grads_of(model)))
    torch.manual_seed(8)  # another draw: other masks, other gradients
    assert not torch.equal(
        micro(model, model, batch(model), 3)[1]["heads.f.1.weight"], got[1]["heads.f.1.weight"]
    )


SHARES = [3, 5]  # rank 0's and rank 1's rows of the global batch: unequal, as bad samples make


def run_rank(rank: int, init_file: str, out_dir: str, bert: str) -> None:
    from threetowers.backbones.text_encoder import load_text_encoder

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for case, kind, block in CASES:
            model = model_of(case, kind, block, load_text_encoder(bert))
            ddp = _distributed_data_parallel(model, torch.device("cpu"), model.loss_fn)
            start = sum(SHARES[:rank])
            tensors = batch(model, slice(start, start + SHARES[rank]))
            results[f"{case}/{kind}/{block}"] = micro(model, ddp, tensors, 2, SHARES)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from tests.conftest import save_tiny_bert

    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("ranks")
    bert = str(save_tiny_bert(out / "bert"))
    mp.spawn(run_rank, args=(str(out / "init"), str(out), bert), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize(("case", "kind", "block"), CASES)
def test_two_ranks_in_micro_batches_give_one_process_whole_batch(
    two_ranks, case, kind, block, tiny_text_encoder
):
    """Each rank's loss is its share's, averaged over the ranks as DDP averages gradients;
    the gradients, DDP's and the loss scales' averaged by the step, are the whole batch's."""
    model = model_of(case, kind, block, tiny_text_encoder)
    loss, grads = whole(model, model, batch(model))
    losses = [ranks[f"{case}/{kind}/{block}"][0] for ranks in two_ranks]
    torch.testing.assert_close(sum(losses) / 2, loss, rtol=1e-12, atol=1e-12)
    for ranks in two_ranks:
        assert_same((loss, ranks[f"{case}/{kind}/{block}"][1]), (loss, grads))


def test_a_runs_logged_losses_equal_without_micro_batches_or_checkpointing(world_dir, tmp_path):
    from tests.helpers.runs import tiny_run_config
    from threetowers.trainer.loop import train

    def losses(*overrides: str) -> list[float]:
        cfg = tiny_run_config(world_dir, tmp_path / "cache", "train.steps=4", *overrides)
        run = train(cfg, tmp_path / "-".join(overrides or ("whole",)), progress=False)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    whole_batch = losses()
    assert len(whole_batch) == 4
    assert losses("train.micro_batch=5") == pytest.approx(whole_batch, rel=1e-5)
    assert losses("train.activation_checkpointing=true") == pytest.approx(whole_batch, rel=1e-6)
    both = losses("train.micro_batch=5", "train.activation_checkpointing=true")
    assert both == pytest.approx(whole_batch, rel=1e-5)


def test_a_run_resumed_in_micro_batches_goes_on_to_the_same_losses(world_dir, tmp_path):
    """On smaller GPUs a run goes on in micro-batches with checkpointed blocks (a resume may
    change them): the steps after the resume log the uninterrupted run's losses."""
    from tests.helpers.runs import tiny_run_config
    from threetowers.trainer.loop import train

    def run_config(*overrides: str) -> tt.Config:
        common = ["train.steps=4", "train.checkpoint_every=2"]
        return tiny_run_config(world_dir, tmp_path / "cache", *common, *overrides)

    def losses(run: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {line["step"]: line["loss"] for line in lines if "loss" in line}

    whole = train(run_config(), tmp_path / "whole", progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # it stopped at step 2
    smaller = ["train.micro_batch=5", "train.activation_checkpointing=true"]
    train(run_config(*smaller), resumed, progress=False)
    expected, got = losses(whole), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4] and got[2] == expected[2]
    assert [got[3], got[4]] == pytest.approx([expected[3], expected[4]], rel=1e-5)
    recorded = tt.load_config(resumed / "config.yaml").train
    assert (recorded.micro_batch, recorded.activation_checkpointing) == (5, True)
