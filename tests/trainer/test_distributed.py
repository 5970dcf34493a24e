"""Two gloo ranks under DDP equal one process holding the concatenated batch, also when
the ranks hold different numbers of rows (bad samples leave batches); the long phases' meeting
outlives the training collectives' timeout; train.device resolved."""

from __future__ import annotations

import itertools
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import tiny_batch, tiny_model
from threetowers import distributed
from threetowers.config import ConfigError
from threetowers.distributed import local_batch_size

WORLD = 2
GLOBAL_BATCH = 8
# (mode, kind, loss.block_size, rank 0's rows of the 8): blocked terms on two ranks (their
# share path) must equal the plain terms in one process too.
CASES = [
    *itertools.product(["clip", "lit", "3t"], ["softmax", "sigmoid"], [0], [4]),
    ("3t", "softmax", 3, 4),
    ("3t", "sigmoid", 3, 4),
    ("clip", "softmax", 0, 3),
    ("3t", "softmax", 0, 5),
    ("3t", "sigmoid", 3, 1),
    ("lit", "softmax", 3, 6),
]


def loss_and_grads(model, module, images, tokens):
    out = model(images, tokens)
    loss, _ = module.loss(out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images, tokens = tiny_batch(GLOBAL_BATCH)
        results = {}
        for mode, kind, block, first_rows in CASES:
            shard = slice(0, first_rows) if rank == 0 else slice(first_rows, GLOBAL_BATCH)
            module = tiny_model(mode, f"loss.kind={kind}", f"loss.block_size={block}")
            ddp = DistributedDataParallel(module)
            loss, grads = loss_and_grads(ddp, module, images[shard], tokens[shard])
            dist.all_reduce(loss)
            results[(mode, kind, block, first_rows)] = (loss / WORLD, grads)
        try:
            local_batch_size(GLOBAL_BATCH + 1)
        except ValueError as error:
            results["odd batch"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(run_rank, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize(("mode", "kind", "block", "first_rows"), CASES)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(
    two_rank_results, mode, kind, block, first_rows
):
    module = tiny_model(mode, f"loss.kind={kind}")
    images, tokens = tiny_batch(GLOBAL_BATCH)
    expected_loss, expected_grads = loss_and_grads(module, module, images, tokens)
    for rank_results in two_rank_results:
        loss, grads = rank_results[(mode, kind, block, first_rows)]
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(two_rank_results):
    for rank_results in two_rank_results:
        assert rank_results["odd batch"] == (
            "data.batch_size=9 is the global batch and must split evenly over the 2 ranks; "
            "use a multiple of 2"
        )
    assert local_batch_size(9) == 9  # one process takes the whole batch


def test_a_global_batch_that_does_not_split_is_a_config_error(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="data.batch_size=9 is the global batch"):
        local_batch_size(9)


SHORT = timedelta(seconds=2)  # the training group's timeout in this test
LATE = 4  # seconds rank 1 arrives after rank 0


def meet_late(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 comes LATE seconds after rank 0, past the training group's timeout: to meet(),
    then to a training barrier; rank 0 runs a main_first block before rank 1."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=SHORT
    )
    log = Path(out_dir) / f"rank{rank}.txt"
    with open(log, "w") as handle:
        with distributed.main_first():
            handle.write(f"block {time.monotonic()}\n")
            time.sleep(LATE if rank == 0 else 0)
        for meeting in (distributed.meet, dist.barrier):  # the latter on the training group
            time.sleep(LATE if rank == 1 else 0)
            try:
                meeting()
                handle.write(f"{meeting.__name__} met\n")
            except RuntimeError:
                handle.write(f"{meeting.__name__} timed out\n")
                break


def test_a_long_phase_meets_past_the_training_timeout_where_a_barrier_fails(tmp_path):
    mp.spawn(meet_late, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    logs = [(tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in range(WORLD)]
    assert [log[1:] for log in logs] == [["meet met", "barrier timed out"]] * WORLD
    entered = [float(log[0].split()[1]) for log in logs]
    assert entered[1] - entered[0] >= LATE  # rank 1's block began after rank 0's ended


def test_train_device_resolves_to_a_visible_device(monkeypatch):
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device is visible"):
        distributed.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.resolve_device("auto") == torch.device("cuda")
