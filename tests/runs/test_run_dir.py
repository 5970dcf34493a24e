"""Run-directory helpers: metrics log (with TensorBoard when present) and resume trimming."""

from __future__ import annotations

import json
import sys
import types

from threetowers.runs.run_dir import MetricsLog, drop_metrics_after


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
