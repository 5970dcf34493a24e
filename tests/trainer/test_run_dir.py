"""Run-directory helpers: metrics log (with TensorBoard when present), resume trimming, and
which config a start of a run trains (a run recorded in fp32, as every run before
train.precision=auto was, resumed under auto)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import threetowers as tt
from threetowers.cli import main
from threetowers.config import ConfigError, load_config
from threetowers.trainer.run_dir import (
    MetricsLog,
    config_to_train,
    drop_metrics_after,
    prepare_run_dir,
    record_config,
    same_config,
)


def test_metrics_go_to_jsonl_and_tensorboard_when_installed(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLog(tmp_path)
    log.log({"step": 3, "loss": 1.5, "lr": 0.1})
    log.log({"step": 3, "eval": {"zeroshot_top1": 40.0, "mode": "3t"}})
    log.close()
    assert scalars == [
        ("train/loss", 1.5, 3),
        ("train/lr", 0.1, 3),
        ("eval/zeroshot_top1", 40.0, 3),
        "closed",
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 3]


def test_resume_forgets_what_a_killed_run_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    drop_metrics_after(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_a_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 4))
    path.write_text(whole + '{"step": 4, "lo')  # killed in the middle of a write
    drop_metrics_after(path, 3)
    assert path.read_text() == whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left


def tiny(*overrides: str) -> tt.Config:
    return tt.load_config("tiny", list(overrides))


def test_a_config_yaml_written_before_a_setting_existed_is_the_same_config(tmp_path):
    cfg = tiny()
    record_config(cfg, tmp_path)
    written = (tmp_path / "config.yaml").read_text()
    # as a version without train.max_bad_steps wrote it: the default stands for it
    (tmp_path / "config.yaml").write_text(written.replace("  max_bad_steps: 10\n", ""))
    assert same_config(cfg, tmp_path)
    assert not same_config(tiny("train.max_bad_steps=3"), tmp_path)


def test_a_run_without_a_checkpoint_trains_the_config_it_is_given(tmp_path):
    record_config(tiny(), tmp_path)
    other = tiny("train.lr=0.01")
    assert config_to_train(other, tmp_path, None) is other


def test_the_recorded_history_of_a_continued_run_is_kept_on_resume(tmp_path):
    record_config(tiny("train.steps=8", "train.continued_from=[4]"), tmp_path)
    admitted = config_to_train(tiny("train.steps=8"), tmp_path, 6)
    assert admitted.train.continued_from == [4]
    assert same_config(admitted, tmp_path)


def test_a_larger_train_steps_continues_the_run_and_records_the_steps_before(tmp_path):
    record_config(tiny("train.steps=8", "train.continued_from=[4]"), tmp_path)
    admitted = config_to_train(tiny("train.steps=20"), tmp_path, 8)
    assert (admitted.train.steps, admitted.train.continued_from) == (20, [4, 8])


def test_another_config_is_refused_once_the_run_has_a_checkpoint(tmp_path):
    record_config(tiny("train.steps=8"), tmp_path)
    for overrides, differ in (
        (["train.steps=8", "train.lr=0.01", "model.embed_dim=16"], "model.embed_dim, train.lr"),
        (["train.steps=6"], "train.steps"),  # fewer steps: not a continuation
        (["train.steps=12", "train.lr=0.01"], "train.steps, train.lr"),
        (["train.steps=8", "train.lr=0.01", "train.micro_batch=4"], "train.lr"),
    ):
        with pytest.raises(ConfigError) as refused:
            config_to_train(tiny(*overrides), tmp_path, 8)
        assert str(refused.value) == (
            f"{tmp_path} holds a run with a different config ({tmp_path}/config.yaml: {differ} "
            "differ) and a checkpoint of step 8; resuming it with this one would mix two runs. "
            "Use the same config to resume (train.micro_batch, train.activation_checkpointing, "
            "train.checkpoint_every, train.keep_checkpoints, train.log_every may differ), only a "
            f"larger train.steps to continue it, or a new run directory (train.init_from="
            f"{tmp_path} starts from its weights)"
        )


def test_a_resume_may_change_memory_and_bookkeeping_settings_which_config_yaml_records(
    tmp_path, caplog
):
    record_config(tiny("train.steps=8", "train.precision=fp32"), tmp_path)
    smaller = ["train.micro_batch=4", "train.activation_checkpointing=true"]
    with caplog.at_level(logging.INFO, logger="threetowers.trainer.run_dir"):
        admitted = config_to_train(tiny("train.steps=8", *smaller), tmp_path, 6)
    train = admitted.train
    assert (train.micro_batch, train.activation_checkpointing, train.steps) == (4, True, 8)
    assert train.precision == "fp32"  # as made: a rewritten config.yaml records it, not auto
    assert caplog.messages == [
        f"{tmp_path} goes on with train.micro_batch=4 (was 0), "
        "train.activation_checkpointing=True (was False) (memory and bookkeeping: the same "
        "training)"
    ]
    record_config(admitted, tmp_path)
    assert load_config(tmp_path / "config.yaml").train.micro_batch == 4
    # the command that made the run goes on with the settings it names
    assert config_to_train(tiny("train.steps=8"), tmp_path, 7).train.micro_batch == 0
    # with a continuation
    continued = config_to_train(tiny("train.steps=12", "train.keep_checkpoints=9"), tmp_path, 8)
    assert (continued.train.continued_from, continued.train.keep_checkpoints) == ([8], 9)
    assert continued.train.micro_batch == 0


def test_continued_from_must_lie_before_the_steps():
    with pytest.raises(ConfigError, match=r"continued_from must be increasing steps below steps=8"):
        tiny("train.steps=8", "train.continued_from=[4, 4]")
    with pytest.raises(ConfigError, match=r"got \[8\]; leave it out"):
        tiny("train.steps=8", "train.continued_from=[8]")


def test_files_of_a_run_without_its_config_are_neither_deleted_nor_used(tmp_path):
    cfg = tt.load_config("tiny")
    (tmp_path / "tokenizer.json").write_text("the user's own")
    with pytest.raises(ConfigError, match="holds tokenizer.json but no config.yaml"):
        prepare_run_dir(cfg, tmp_path, None)
    assert (tmp_path / "tokenizer.json").read_text() == "the user's own"


# train.precision=auto against a run directory made before it existed, which records fp32.


def recorded_in_fp32(run_dir, *overrides: str) -> str:
    record_config(tiny("train.precision=fp32", *overrides), run_dir)
    return (run_dir / "config.yaml").read_text()


def test_auto_resumes_a_run_recorded_in_fp32_on_the_cpu_as_it_was_written(tmp_path, caplog):
    written = recorded_in_fp32(tmp_path)
    with caplog.at_level(logging.INFO, logger="threetowers"):
        for checkpoint in (None, 4):  # before and after its first checkpoint
            admitted = config_to_train(tiny(), tmp_path, checkpoint)
            assert admitted == tiny()  # auto is fp32 here
            assert prepare_run_dir(tiny(), tmp_path, checkpoint) == tiny()
            record_config(admitted, tmp_path)
            assert (tmp_path / "config.yaml").read_text() == written  # its fingerprint kept
    assert same_config(tiny(), tmp_path)
    assert "precision" not in caplog.text


def test_auto_resumes_a_run_recorded_in_fp32_on_a_gpu_in_fp32_and_says_so(
    tmp_path, monkeypatch, caplog
):
    """auto is bf16 on CUDA, another run than the recorded fp32: the run goes on as it began."""
    written = recorded_in_fp32(tmp_path)
    with monkeypatch.context() as gpu, caplog.at_level(logging.INFO, logger="threetowers"):
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        admitted = config_to_train(tiny(), tmp_path, 4)
    assert admitted == tiny("train.precision=fp32")
    assert caplog.messages == [
        f"{tmp_path} was made with train.precision=fp32 and goes on in it; "
        "train.precision=auto would be bf16 on this machine, which a new run directory gets"
    ]
    record_config(admitted, tmp_path)
    assert (tmp_path / "config.yaml").read_text() == written


def test_a_continuation_under_auto_records_the_precision_the_run_was_made_in(tmp_path):
    recorded_in_fp32(tmp_path, "train.steps=8")
    admitted = config_to_train(tiny("train.steps=20"), tmp_path, 8)
    assert (admitted.train.precision, admitted.train.continued_from) == ("fp32", [8])
    record_config(admitted, tmp_path)  # config.yaml rewritten: a later GPU must read fp32
    assert tt.load_config(tmp_path / "config.yaml").train.precision == "fp32"


def test_a_precision_named_against_the_recorded_one_is_another_run(tmp_path):
    recorded_in_fp32(tmp_path)
    with pytest.raises(
        ConfigError, match=r"config.yaml: train.precision differ\) and a checkpoint"
    ):
        config_to_train(tiny("train.precision=bf16"), tmp_path, 4)
    # before a checkpoint another config replaces the recorded one, auto as given
    other = tiny("train.lr=0.01")
    assert config_to_train(other, tmp_path, None) is other


FIXTURE = Path(__file__).parents[1] / "fixtures" / "run_before_issue_39"


def test_the_command_that_made_a_run_before_auto_continues_it_as_before(tmp_path, monkeypatch):
    """tests/fixtures/run_before_issue_39 was made by `train config.yaml`, no precision given
    (fp32 then, auto now): the same command with train.steps=6 continues it to the old code's
    numbers, and its config.yaml goes on recording fp32."""
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    shutil.copy(FIXTURE / "config.yaml", tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(FutureWarning):  # its model.third, which config.yaml still names
        assert main(["train", "config.yaml", "train.steps=6", "--quiet"]) == 0
    expected = json.loads((FIXTURE / "continued_to_6.json").read_text())["metrics"]
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [line for line in lines if line["step"] > 4 and "eval" not in line]
    assert [line["step"] for line in steps] == [5, 6]
    for line, old in zip(steps, expected, strict=True):
        assert line["loss"] == pytest.approx(old["loss"], rel=1e-6)
    assert tt.load_config(tmp_path / "run" / "config.yaml").train.precision == "fp32"
