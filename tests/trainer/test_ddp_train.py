"""`torchrun --nproc_per_node 2 -m threetowers train`: two gloo ranks train the weights of one
process with the same global batch (bad samples included), resume exactly, and write the
run's files once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import load_file

from tests.helpers.images import COLOURS, SHAPES, picture
from threetowers.config import load_config
from threetowers.data.sources.loader import pair_batches
from threetowers.data.sources.pairs import open_pairs
from threetowers.errors import UserError
from threetowers.trainer.loop import train

WORLD, GLOBAL_BATCH, SAMPLES, STEPS = 2, 8, 48, 6  # one epoch
RECORD_READS = Path(__file__).with_name("record_cache_reads.py")
OTHER_RUN_DIR = Path(__file__).with_name("other_run_dir_on_rank_1.py")
UNREADABLE = (5, 17, 30)  # these rows' image files are not images


def write_table(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for index in range(SAMPLES):
        name = f"images/{index:03d}.png"
        image = b"not a picture" if index in UNREADABLE else picture(index)
        (root / name).write_bytes(image)
        caption = f"a {COLOURS[index % 4]} {SHAPES[index // 4 % 4]}"
        rows.append(json.dumps({"image": name, "caption": caption}))
    table = root / "pairs.jsonl"
    table.write_text("\n".join(rows) + "\n")
    return table


def write_config(
    root: Path, table: Path, mode: str = "3t", cache: bool = False, frozen: list | None = None
) -> Path:
    config = {
        "model": {
            "mode": mode,
            "embed_dim": 16,
            "image": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": {"vocab_size": 120, "context_length": 8, "width": 32, "depth": 1, "heads": 2},
            "frozen": frozen or [{"name": "h", "image_size": 32}],
        },
        "data": {
            "train": str(table),
            "batch_size": GLOBAL_BATCH,
            "num_workers": 0,
            "cache": cache,
            "max_bad_fraction": 0.2,
            "cache_dir": str(root / "cache"),
        },
        "train": {
            "steps": STEPS,
            "warmup_steps": 2,
            "checkpoint_every": 3,
            "keep_checkpoints": 5,
            "log_every": 1,
            "device": "cpu",
        },
    }
    path = root / f"{mode}-cache{cache}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(config: Path, run: Path, recording: Path | None = None) -> None:
    """Train under torchrun; ``recording``: with each rank's cache reads recorded there."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    program = ["-m", "threetowers"] if recording is None else [str(RECORD_READS)]
    command += [f"--nproc_per_node={WORLD}", *program, "train", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CACHE_READS=str(recording))
    done = subprocess.run(
        command + ["--run-dir", str(run), "--quiet"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    config = write_config(root, write_table(root / "data"))  # 3t, h live: outside DDP
    single = train(load_config(config), root / "single", progress=False)
    torchrun(config, root / "ranks")
    return {"root": root, "config": config, "single": single, "ranks": root / "ranks"}


def test_bad_samples_leave_the_ranks_with_different_batch_sizes(runs):
    """The premise of the comparison below: the ranks' shares of some batches differ."""
    table = open_pairs(load_config(runs["config"]).data.train)

    def sizes(rank: int) -> list[int]:
        batches = pair_batches(
            table,
            example=lambda pair, rng: {"captions": pair.caption},
            batch_size=GLOBAL_BATCH // WORLD,
            seed=0,
            epoch=0,
            rank=rank,
            world_size=WORLD,
        )
        return [len(batch["ids"]) for batch in batches]

    per_rank = [sizes(rank) for rank in range(WORLD)]
    assert all(min(counts) > 0 for counts in per_rank)  # no step is skipped
    assert per_rank[0] != per_rank[1]


def test_two_ranks_train_the_weights_of_one_process_with_the_global_batch(runs):
    expected, got = weights(runs["single"]), weights(runs["ranks"])
    assert expected.keys() == got.keys()
    # Within a tenth of one step of the learning rate (1e-3): the attention key biases have
    # a gradient of exactly zero (softmax ignores a shift per query), so their updates are
    # Adam's normalised float noise, which differs with the summation order.
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


def test_two_ranks_whose_micro_batch_holds_their_share_train_the_weights_of_one_process(runs):
    """micro_batch above each rank's 4 rows: one pass, the loss's scales outside DDP all the
    same (their gradients averaged by the step)."""
    config = yaml.safe_load(runs["config"].read_text())
    config["train"]["micro_batch"] = GLOBAL_BATCH
    path = runs["root"] / "micro.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun(path, runs["root"] / "micro-ranks")
    expected, got = weights(runs["single"]), weights(runs["root"] / "micro-ranks")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


def test_two_ranks_share_the_feature_cache_they_build(runs):
    root = runs["root"]
    config = write_config(root, root / "data" / "pairs.jsonl", mode="lit", cache=True)
    torchrun(config, root / "lit-ranks")  # builds the cache
    single = train(load_config(config), root / "lit-single", progress=False)  # reuses it
    expected, got = weights(single), weights(root / "lit-ranks")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("second", ["image", "text"])
def test_two_ranks_train_with_two_frozen_towers_as_one_process(runs, second):
    root = runs["root"]
    towers = [{"name": "big", "image_size": 32}, {"name": "small", "image_size": 16}]
    if second == "text":  # the packaged MiniLM, reading each rank's captions
        towers[1] = {"name": "small", "backbone": "minilm"}
    config = write_config(root, root / "data" / "pairs.jsonl", cache=True, frozen=towers)
    config = config.rename(config.with_name(f"two-{second}.yaml"))
    torchrun(config, root / f"two-ranks-{second}")
    single = train(load_config(config), root / f"two-single-{second}", progress=False)
    expected, got = weights(single), weights(root / f"two-ranks-{second}")
    assert {"heads.fbig.weight", "heads.gsmall.weight"} <= expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


def write_shards(table: Path, shards: int = 4) -> Path:
    """The table's samples (unreadable images included) as ``shards`` tar shards."""
    folder = table.parent / "shards"
    folder.mkdir()
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    per_shard = len(rows) // shards
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"part-{shard}.tar")) as sink:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                image = (table.parent / rows[index]["image"]).read_bytes()
                sink.write({"__key__": f"{index:03d}", "png": image, "txt": rows[index]["caption"]})
    return folder


def test_two_ranks_with_two_cached_towers_read_only_their_own_shards_caches(runs):
    root = runs["root"]
    towers = [{"name": "big", "image_size": 32}, {"name": "small", "image_size": 16}]
    shards = write_shards(root / "data" / "pairs.jsonl")
    config = write_config(root, shards, cache=True, frozen=towers)
    recording = root / "reads"
    recording.mkdir()
    torchrun(config, root / "shard-ranks", recording)
    assert [r["step"] for r in train_records(root / "shard-ranks") if "loss" in r] == list(
        range(1, STEPS + 1)
    )
    source = open_pairs(shards)
    order = source.shard_order(0, 0)  # one epoch: the ranks' shares of epoch 0
    for rank in range(WORLD):
        reads = (recording / f"rank{rank}.txt").read_text().split()
        training = [Path(read) for read in reads if "-eval-" not in Path(read).parent.name]
        read_shards = {}
        for path in training:  # unit -> the shard its index names
            identity = json.loads(path.with_suffix(".json").read_text())["identity"]
            read_shards.setdefault(path.parent.name, set()).add(identity["ids"][1])
        expected = {str(source.shards[i]) for i in order[rank::WORLD]}
        assert len(read_shards) == 2  # both towers' caches (one folder each)
        assert all(shards_read == expected for shards_read in read_shards.values()), rank


def test_the_ranks_log_the_global_loss_and_counts_once(runs):
    single, ranks = train_records(runs["single"]), train_records(runs["ranks"])
    steps = [r for r in ranks if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in ranks if "eval" in r] == [STEPS]  # one evaluation
    for mine, theirs in zip(steps, [r for r in single if "loss" in r], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["data/bad_samples"] == theirs["data/bad_samples"]
    assert steps[-1]["data/bad_samples"] == len(UNREADABLE)
    assert sorted(p.name for p in (runs["ranks"] / "checkpoints").iterdir()) == [
        "step_00000003",
        "step_00000006",
    ]


def test_a_run_resumed_under_torchrun_ends_with_the_same_weights(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["ranks"], resumed)
    # A crash after step 3's checkpoint: the later checkpoint and the evaluation are lost.
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    (resumed / "eval.json").unlink()
    torchrun(runs["config"], resumed)
    expected, got = weights(runs["ranks"]), weights(resumed)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert [r["step"] for r in train_records(resumed) if "loss" in r] == list(range(1, STEPS + 1))


def test_a_two_rank_run_on_a_table_resumes_in_one_process_as_it_would_on_two(runs, tmp_path):
    """A table's global batch b is the same rows at any number of ranks, so the data
    position means the same pairs in one process."""
    run = tmp_path / "ranks"
    shutil.copytree(runs["ranks"], run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")  # resume from step 3
    (run / "eval.json").unlink()
    train(load_config(runs["config"]), run, progress=False)
    expected, got = weights(runs["ranks"]), weights(run)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)
    records = [r for r in train_records(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["data/bad_samples"] == len(UNREADABLE)  # each sample read once


def test_a_two_rank_run_on_shards_resumed_by_one_process_stops_with_one_message(tmp_path):
    shards = write_shards(write_table(tmp_path / "data"))
    config = write_config(tmp_path, shards, mode="clip")
    run = tmp_path / "ranks"
    torchrun(config, run)
    with pytest.raises(UserError) as stopped:
        train(load_config(config), run, progress=False)
    assert str(stopped.value) == (
        f"{run / 'checkpoints' / f'step_{STEPS:08d}'} was saved by a run of 2 rank(s) and this "
        "start has 1: each rank reads shards of its own, so the rest of the epoch is planned "
        "for 2 rank(s). Resume it on 2 rank(s) (torchrun's nodes x processes per node), or "
        f"start a new run from its weights with train.init_from={run}"
    )


def test_ranks_that_resume_different_checkpoints_stop_with_one_message(runs, tmp_path):
    """A run directory that is not one shared folder: rank 1's copy has an older checkpoint."""
    run, other = tmp_path / "ranks", tmp_path / "rank1"
    shutil.copytree(runs["ranks"], run)
    shutil.copytree(runs["ranks"], other)
    shutil.rmtree(other / "checkpoints" / f"step_{STEPS:08d}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", str(OTHER_RUN_DIR), "train", str(runs["config"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", RUN_DIR_OF_RANK_1=str(other))
    run_command = command + ["--run-dir", str(run), "--quiet"]
    done = subprocess.run(run_command, env=env, text=True, capture_output=True)
    assert done.returncode != 0
    older = max(int(step.name.split("_")[1]) for step in (other / "checkpoints").glob("step_*"))
    assert older < STEPS
    assert (
        f"rank 1 resumed the checkpoint of step {older} from {run / 'checkpoints'} but rank 0 "
        f"resumed the checkpoint of step {STEPS}: the ranks do not see one run directory. Put "
        f"{run} on a filesystem that every node shares"
    ) in done.stderr
