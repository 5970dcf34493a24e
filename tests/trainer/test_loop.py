"""End to end on a tiny embedded world: training, exact resume after SIGKILL, cache vs live h."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import threetowers as tt
from tests.helpers.feature_caches import colliding_shards
from tests.helpers.runs import (
    TRAIN_ENV,
    clip_run_config,
    final_weights,
    tiny_run_config,
    train_command,
    write_config,
)
from threetowers.cli import main
from threetowers.data.sources.bad_samples import BadDataError
from threetowers.files.checkpoints import load_latest
from threetowers.trainer import start
from threetowers.trainer.loop import train


def test_run_directory_holds_config_metrics_tokenizer_and_checkpoints(world_dir, tmp_path):
    cfg = tiny_run_config(
        world_dir, tmp_path / "cache", "train.steps=4", "train.checkpoint_every=2"
    )
    run = train(cfg, tmp_path / "run", progress=False)
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "environment.json", "metrics.jsonl", "tokenizer.json"} <= names
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval" in r] == [4]
    scores = json.loads((run / "eval.json").read_text())
    assert {"i2t_R@1", "t2i_R@1", "zeroshot_top1", "fewshot_top1", "alpha_sweep"} <= set(scores)
    assert [row["alpha"] for row in scores["alpha_sweep"]] == pytest.approx(
        [i / 10 for i in range(11)]
    )
    assert (run / "alpha_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"].startswith("2.")
    # what decides float rounding, for runs of one experiment made on several machines
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (env["cuda_device"] is None) == (not torch.cuda.is_available())
    # A crash after the last checkpoint but before the evaluation: re-running evaluates.
    (run / "eval.json").unlink()
    train(cfg, run, progress=False)
    assert json.loads((run / "eval.json").read_text())["step"] == 4
    with pytest.raises(tt.ConfigError, match="holds a run with a different config"):
        train(tiny_run_config(world_dir, tmp_path / "cache", "train.lr=0.01"), run, progress=False)


# Two frozen towers: EfficientNet-Lite0 at two input sizes, so each has its own features.
TWO_TOWERS = (
    "model.frozen=[{name: inet, image_size: 64}, {name: small, image_size: 32, weight: 0.5}]"
)


# An image tower and the packaged MiniLM on the caption side.
IMAGE_AND_TEXT_TOWERS = (
    "model.frozen=[{name: inet, image_size: 64}, {name: words, backbone: minilm}]"
)


LOCKED_TEXT = ["model.mode=lit", "model.frozen=[{name: words, backbone: minilm}]"]


@pytest.mark.parametrize(
    "towers",
    [[], [TWO_TOWERS], [IMAGE_AND_TEXT_TOWERS], LOCKED_TEXT],
    ids=["one_frozen_tower", "two", "image_and_text", "lit_locked_text"],
)
def test_killed_run_resumes_to_the_same_weights(world_dir, tmp_path, towers):
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "train.steps=40",
        "train.checkpoint_every=5",
        "model.mode=3t",
        *towers,
    )
    config = write_config(cfg, tmp_path / "run.yaml")
    command = [sys.executable, "-m", "threetowers", "train", str(config), "--quiet", "--run-dir"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run(command + [str(tmp_path / "straight")], check=True, env=env)

    interrupted = tmp_path / "interrupted"
    for kill_after in ("step_00000005", "step_00000020"):
        process = subprocess.Popen(command + [str(interrupted)], env=env)
        deadline = time.time() + 120
        while not (interrupted / "checkpoints" / kill_after).exists():
            assert process.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (interrupted / "checkpoints" / "step_00000040").exists()
    subprocess.run(command + [str(interrupted)], check=True, env=env)

    expected, got = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    records = [
        json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert not list((interrupted / "checkpoints").glob(".tmp-*"))
    if towers == LOCKED_TEXT:  # f trained against MiniLM's embedding of each caption
        assert {key for key in records[0] if key.startswith("loss/")} == {"loss/f_words"}
        scores = json.loads((interrupted / "eval.json").read_text())
        assert scores["mode"] == "lit" and "alpha_sweep" not in scores
        assert {"i2t_R@1", "t2i_R@1", "zeroshot_top1"} <= set(scores)
    elif towers:  # every term of both towers logged; the evaluation sweeps the weight grid
        second = "small" if towers == [TWO_TOWERS] else "words"
        terms = {key for key in records[0] if key.startswith("loss/")}
        assert terms == {
            f"loss/{t}"
            for t in (
                "f_g",
                "finet_inet",
                "ginet_inet",
                f"f{second}_{second}",
                f"g{second}_{second}",
            )
        }
        scores = json.loads((interrupted / "eval.json").read_text())
        assert len(scores["alpha_grid"]) == 66 and "alpha_sweep" not in scores
        corner = next(r for r in scores["alpha_grid"] if r["weights"]["f"] == 1.0)
        assert corner["i2t_R@1"] == scores["i2t_R@1"]  # a_f = 1 is the deployed f and g
        assert (interrupted / "alpha_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "data", ["world", "colliding_keys", "two_frozen_towers", "image_and_text_towers"]
)
def test_cached_frozen_features_give_the_live_loss(world_dir, tmp_path, data):
    # colliding_keys: two shards whose samples share their keys, with other images
    extra = {"two_frozen_towers": [TWO_TOWERS], "image_and_text_towers": [IMAGE_AND_TEXT_TOWERS]}
    extra = extra.get(data, [])
    if data == "colliding_keys":
        extra = [f"data.train={colliding_shards(tmp_path / 'data')}", "data.batch_size=10"]
    losses = {}
    for cache in (True, False):
        cfg = tiny_run_config(
            world_dir,
            tmp_path / "cache",
            "train.steps=3",
            "data.augment=false",
            f"data.cache={cache}",
            *extra,
        )
        run = train(cfg, tmp_path / f"cache_{cache}", progress=False)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[cache] = [r["loss"] for r in records if "loss" in r]
    assert list((tmp_path / "cache").glob("efficientnet_lite0-*/*.npy"))
    if data == "image_and_text_towers":  # every caption of each shard, once
        assert list((tmp_path / "cache").glob("all-MiniLM-L6-v2-*/*.npy"))
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def poison_losses(monkeypatch, bad_calls):
    """Make the loss non-finite on the given (1-based) calls of ThreeTowers.loss."""
    original, calls = tt.ThreeTowers.loss, [0]

    def loss(self, out, counts=None):
        total, logs = original(self, out, counts)
        calls[0] += 1
        if calls[0] in bad_calls:
            total = total * float("nan")
            logs["loss"] = total.detach()
        return total, logs

    monkeypatch.setattr(tt.ThreeTowers, "loss", loss)


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def test_non_finite_steps_are_skipped_counted_and_never_reach_the_weights(
    world_dir, tmp_path, monkeypatch
):
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "model.mode=clip",
        "train.steps=6",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
        "train.max_bad_steps=3",
    )
    poison_losses(monkeypatch, {3, 4})
    run = train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert [steps[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert math.isnan(steps[3]["loss"]) and math.isfinite(steps[5]["loss"])
    for skipped in (3, 4):  # no update: the weights of step 2 unchanged
        for key, value in checkpoint_weights(run, skipped).items():
            assert torch.equal(value, checkpoint_weights(run, 2)[key]), key
    final = load_latest(run / "checkpoints")
    assert all(torch.isfinite(v).all() for v in final.model.values())
    adam_steps = {float(s["step"]) for s in final.state["optimizer"]["state"].values()}
    assert adam_steps == {4.0}  # Adam's state saw only the 4 finite steps
    assert final.state["schedule"]["last_epoch"] == 6  # the schedule did not pause


def test_consecutive_non_finite_steps_stop_with_the_last_good_checkpoint(
    world_dir, tmp_path, monkeypatch, capsys
):
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "model.mode=clip",
        "train.steps=10",
        "train.checkpoint_every=2",
        "train.max_bad_steps=3",
    )
    config = write_config(cfg, tmp_path / "run.yaml")
    poison_losses(monkeypatch, set(range(4, 100)))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "training stopped at step 6: 3 steps in a row had a non-finite loss" in err
    assert "step_00000004, is intact" in err and "train.max_bad_steps" in err
    assert "Traceback" not in err
    latest = load_latest(run / "checkpoints")
    assert latest.step == 4
    for key, value in latest.model.items():  # step 4 was skipped: step 3's weights
        assert torch.isfinite(value).all(), key


def test_an_epoch_without_a_single_batch_is_an_error_not_a_hang(world_dir, tmp_path):
    cfg = tiny_run_config(
        world_dir, tmp_path / "cache", "model.mode=clip", "data.batch_size=1000", "train.steps=2"
    )
    with pytest.raises(BadDataError, match="gave no batch to train on.*data.batch_size=1000"):
        train(cfg, tmp_path / "run", progress=False)


def test_resume_from_the_end_of_an_epoch(world_dir, tmp_path):
    # 256 pairs in batches of 32: the checkpoint of step 8 ends epoch 0.
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "model.mode=clip",
        "train.steps=10",
        "train.checkpoint_every=8",
    )
    run = train(cfg, tmp_path / "run", progress=False)
    expected = final_weights(run)
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    assert load_latest(run / "checkpoints").state["batch_in_epoch"] == 8
    got = final_weights(train(cfg, run, progress=False))
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_every_checkpoint_corrupt_stops_before_any_work_and_loses_nothing(
    world_dir, tmp_path, monkeypatch, capsys
):
    cfg, config = clip_run_config(world_dir, tmp_path, "train.steps=4", "train.checkpoint_every=2")
    run = train(cfg, tmp_path / "run", progress=False)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "state.pt").write_bytes(b"a flipped disk block")
    before = {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()}

    def no_data_work(*args, **kwargs):
        raise AssertionError("the training data was opened")

    monkeypatch.setattr(start, "open_data", no_data_work)
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint in" in err[0], err
    for step in (2, 4):
        assert f"step_0000000{step}: state.pt does not match its checksum" in err[0]
    assert "To start over from step 0, move" in err[0]
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def start_training(config: Path, run: Path) -> subprocess.Popen:
    """``threetowers train`` in its own process group (as a cluster job runs), once it has
    logged its third step."""
    process = subprocess.Popen(
        train_command(config, run),
        env=TRAIN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while sum(1 for _ in open_lines(run / "metrics.jsonl")) < 3:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    return process


def open_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_second_writer_of_a_run_directory_is_refused(world_dir, tmp_path, capsys):
    cfg, config = clip_run_config(world_dir, tmp_path, "train.steps=400")
    other = write_config(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1})}),
        tmp_path / "other.yaml",
    )
    run = tmp_path / "run"
    first = start_training(config, run)
    try:
        written = {p: p.read_bytes() for p in (run / "config.yaml", run / "environment.json")}
        for second in (config, other):
            assert main(["train", str(second), "--run-dir", str(run), "--quiet"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0] == (
                f"threetowers train: error: {run} is in use: another threetowers process "
                f"(pid {first.pid}) is writing this run directory; wait for it to finish, or "
                "train in another run directory (--run-dir)"
            )
        assert {p: p.read_bytes() for p in written} == written
        assert first.poll() is None  # the first run goes on, its temporaries untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_rerun_resumes_exactly(
    world_dir, tmp_path
):
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "model.mode=3t",
        "train.steps=20",
        "train.checkpoint_every=100",
        "data.num_workers=2",
    )
    config = write_config(cfg, tmp_path / "run.yaml")
    subprocess.run(train_command(config, tmp_path / "straight"), check=True, env=TRAIN_ENV)
    run = tmp_path / "stopped"
    job = start_training(config, run)
    os.killpg(job.pid, signal.SIGTERM)  # the whole job, loader workers included, as SLURM does
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    step = len([line for line in open_lines(run / "metrics.jsonl") if '"loss"' in line])
    assert 3 <= step < 20
    assert out.strip() == (
        f"threetowers train: stopped by SIGTERM at step {step}; {run}/checkpoints/"
        f"step_{step:08d} saved; re-run the same command to resume"
    )
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    subprocess.run(train_command(config, run), check=True, env=TRAIN_ENV, capture_output=True)
    expected, got = final_weights(tmp_path / "straight"), final_weights(run)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_changed_tokenizer_is_refused_at_resume_before_any_work(world_dir, tmp_path, capsys):
    cfg, config = clip_run_config(world_dir, tmp_path, "train.steps=2", "train.checkpoint_every=1")
    run = train(cfg, tmp_path / "run", progress=False)
    tokenizer = run / "tokenizer.json"
    saved = json.loads(tokenizer.read_text())
    vocab = saved["model"]["vocab"]  # two words trade ids: a tokenizer of the same shape
    first, second = sorted(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer.write_text(json.dumps(saved))
    shutil.rmtree(run / "checkpoints" / "step_00000002")  # so that the run resumes
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 2
    *logged, error = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("threetowers: ") for line in logged)  # the benchmarks, found
    assert error.startswith(
        f"threetowers train: error: {tokenizer} is not the tokenizer that checkpoint step 1 "
        "was trained with (sha256 "
    ), error
    assert error.endswith("restore that tokenizer.json, or train in a new run directory")
    assert main(["eval", str(run)]) == 2  # a loaded run is checked too
    assert "is not the tokenizer that checkpoint step 1" in capsys.readouterr().err


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_goes_on(
    world_dir, tmp_path, small_disk, capsys
):
    run = small_disk(1500)  # the run's files and model.safetensors fit, its state.pt not
    _, config = clip_run_config(world_dir, tmp_path, "train.steps=4", "train.checkpoint_every=2")
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.splitlines()[-1].startswith(
        f"threetowers train: error: not enough disk space in {run / 'checkpoints'} for "
        f"{run / 'checkpoints' / 'step_00000002'}: it needs about "
    ), err
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    small_disk.grow(run, 32768)
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 0
    assert load_latest(run / "checkpoints").step == 4 and (run / "eval.json").exists()


def test_a_damaged_eval_json_is_evaluated_again_and_named(world_dir, tmp_path, capsys):
    cfg, config = clip_run_config(world_dir, tmp_path, "train.steps=2")
    run = train(cfg, tmp_path / "run", progress=False)
    scores = (run / "eval.json").read_text()
    (run / "eval.json").write_text(scores[:18])  # "Unterminated string" before
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"{run / 'eval.json'} is damaged (not JSON: " in err
    assert "it is evaluated again" in err and "Traceback" not in err
    assert json.loads((run / "eval.json").read_text()) == json.loads(scores)
    assert f"results of {run}" in out
