"""The training state a checkpoint holds, and the one rule for periodic actions."""

from __future__ import annotations

import torch

from threetowers.data.sources.bad_samples import BadSampleLog
from threetowers.data.stream import Position
from threetowers.trainer.optim import make_optimizer
from threetowers.trainer.state import StepHealth, TrainingState, due

# state.pt's keys since bad-sample counts were added: older checkpoints must keep loading
CHECKPOINT_KEYS = {
    "optimizer",
    "schedule",
    "rng",
    "epoch",
    "batch_in_epoch",
    "bad_samples",
    "health",
    "sources",
    "world_size",  # since issue 41: what a resume on another number of ranks is told
}


def test_due_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 11) if due(s, 4)] == [4, 8]
    assert [s for s in range(1, 11) if due(s, 4, last=10)] == [4, 8, 10]
    assert not any(due(s, 0) for s in range(1, 11))  # 0: never
    assert [s for s in range(1, 11) if due(s, 0, last=10)] == [10]


def state(seed: int) -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer, schedule = make_optimizer(model, 1e-2, 0.1, 2, 10)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    schedule.step()
    return TrainingState(optimizer, schedule, BadSampleLog(0.5, "test"), StepHealth(3))


def test_a_state_restores_everything_it_saved():
    saved = state(0)
    saved.position.epoch, saved.position.batch_in_epoch = 2, 7
    saved.health.update(False, 5, {"loss": float("nan")}, None)
    saved.sources.samples.update({"cc3m": 30, "laion": 90})
    saved.sources.bad.update({"laion": 2})
    snapshot = saved.state_dict()
    assert set(snapshot) == CHECKPOINT_KEYS
    expected_rng = torch.get_rng_state()
    torch.manual_seed(99)
    restored = state(1)
    restored.load_state_dict(snapshot, step=12)
    assert (restored.step, restored.position) == (12, Position(epoch=2, batch_in_epoch=7))
    assert restored.health.state_dict() == {"in_a_row": 1, "skipped": 1}
    assert restored.sources.state_dict() == {
        "samples": {"cc3m": 30, "laion": 90},
        "bad": {"laion": 2},
    }
    assert restored.schedule.state_dict() == saved.schedule.state_dict()
    assert snapshot["world_size"] == 1
    moments = restored.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, saved.optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_a_checkpoint_without_counts_starts_them_from_zero():
    old = state(0).state_dict()
    del old["bad_samples"], old["health"], old["sources"]
    restored = state(1)
    restored.load_state_dict(old, step=3)
    assert restored.health.skipped == 0 and restored.step == 3


def test_a_checkpoints_data_position_is_restored_where_the_stream_reads_it():
    run = state(0)
    position = run.position  # a BatchStream built before the resume holds this object
    saved = state(1).state_dict() | {"epoch": 3, "batch_in_epoch": 5}  # every checkpoint's keys
    run.load_state_dict(saved, step=40)
    assert run.position is position and position == Position(epoch=3, batch_in_epoch=5)
