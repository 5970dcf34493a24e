"""Two gloo ranks under DDP equal one process holding the concatenated batch."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import tiny_batch, tiny_model

WORLD = 2
GLOBAL_BATCH = 8
# (mode, kind, loss.block_size): blocked terms on two ranks (their share path) must equal the
# plain terms in one process too.
CASES = [
    *itertools.product(["clip", "lit", "3t"], ["softmax", "sigmoid"], [0]),
    ("3t", "softmax", 3),
    ("3t", "sigmoid", 3),
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
        shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        results = {}
        for mode, kind, block in CASES:
            module = tiny_model(mode, f"loss.kind={kind}", f"loss.block_size={block}")
            ddp = DistributedDataParallel(module)
            loss, grads = loss_and_grads(ddp, module, images[shard], tokens[shard])
            dist.all_reduce(loss)
            results[(mode, kind, block)] = (loss / WORLD, grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(run_rank, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize(("mode", "kind", "block"), CASES)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_rank_results, mode, kind, block):
    module = tiny_model(mode, f"loss.kind={kind}")
    images, tokens = tiny_batch(GLOBAL_BATCH)
    expected_loss, expected_grads = loss_and_grads(module, module, images, tokens)
    for rank_results in two_rank_results:
        loss, grads = rank_results[(mode, kind, block)]
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
