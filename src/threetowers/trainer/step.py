"""One optimizer step, built once for a run and called with each global batch.

A step whose loss or gradient is not finite moves neither the weights nor Adam's moments;
the schedule moves on either way (steps, not updates, index the learning rate). Under DDP
the frozen towers run outside the wrapper, before its forward; under ``train.parallel:
fsdp`` the model comes sharded (``trainer/sharding.py``) and is its own wrapper. With
``train.micro_batch`` the towers run a micro-batch at a time and the whole batch's gradients
are accumulated exactly (``trainer/accumulation.py``), the batch coming uint8 so that its
views are normalised a micro-batch at a time; with ``train.activation_checkpointing`` f's
and g's Transformer blocks recompute their activations in the backward pass.
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from threetowers import distributed
from threetowers.config import TrainConfig
from threetowers.data.device import normalised, normalised_views
from threetowers.data.stream import GlobalBatch
from threetowers.data.views import Views
from threetowers.model.three_towers import ThreeTowers, batch_embeddings
from threetowers.towers.transformer import checkpoint_blocks
from threetowers.trainer.accumulation import backward_in_micro_batches
from threetowers.trainer.precision import autocast, use_tf32
from threetowers.trainer.sharding import is_sharded


class TrainStep:
    """``step(batch)``: one optimizer step of ``model`` on a :class:`GlobalBatch`; returns
    its logs and whether it was finite (else nothing moved)."""

    def __init__(
        self,
        model: ThreeTowers,
        optimizer,
        schedule,
        device: torch.device,
        train: TrainConfig,
        views: Views | None = None,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.device = model, optimizer, schedule, device
        self.views = views  # set: batches come uint8, and the step normalises them
        self.precision, self.grad_clip = train.precision, train.grad_clip
        self.micro_batch = train.micro_batch
        if train.activation_checkpointing:
            for tower in (model.image_tower, model.text_tower):
                if tower is not None:
                    checkpoint_blocks(tower)
        self.parameters = model.trainable_parameters()
        multi, sharded = distributed.world_size() > 1, is_sharded(model)
        # The loss's scales sit outside the wrapper when sharded (FSDP cannot shard scalars)
        # or accumulating under DDP: the step averages their gradients itself.
        self.loss_outside = multi and (sharded or self.micro_batch > 0)
        self.forward = model
        if multi and not sharded:
            outside = model.loss_fn if self.loss_outside else None
            self.forward = _distributed_data_parallel(model, device, outside)
        use_tf32(device)

    def __call__(self, batch: GlobalBatch) -> tuple[dict[str, torch.Tensor], bool]:
        self.optimizer.zero_grad(set_to_none=True)
        tensors = batch.tensors
        if 0 < self.micro_batch < max(batch.counts):  # every rank alike
            loss, logs = backward_in_micro_batches(
                self.model,
                self.forward,
                tensors,
                batch.counts,
                self.micro_batch,
                lambda: autocast(self.precision, self.device),
                None if self.views is None else partial(normalised_views, views=self.views),
            )
        else:
            if self.views is not None:
                tensors = normalised(tensors, self.views)
            with autocast(self.precision, self.device):
                out = batch_embeddings(self.model, tensors, self.forward)
                loss, logs = self.model.loss(out, batch.counts)
            loss.backward()
        if self.loss_outside:
            distributed.average_gradients(self.model.loss_fn.parameters())
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        else:
            grads = [p.grad for p in self.parameters if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # sharded gradients' norm, reduced over the ranks
            norm = norm.full_tensor()
        logs["grad_norm"] = norm.detach()
        # One host sync per step (as AMP's GradScaler makes): a non-finite loss or gradient
        # must reach neither the weights nor Adam's moments, so it is decided on all ranks.
        finite = distributed.all_ranks(torch.isfinite(loss.detach() + norm.detach()))
        if finite:
            self.optimizer.step()
            self.model.loss_fn.clamp_temperatures_()
        self.schedule.step()
        return logs, finite


def _distributed_data_parallel(model: ThreeTowers, device: torch.device, outside=None):
    """DDP over the trainable parts. The frozen towers stay outside: DDP neither broadcasts
    nor synchronises their weights and buffers, and the step runs them before the wrapped
    forward. So does the module ``outside`` (the loss, when accumulating), whose gradients the
    step averages itself."""
    ignored = [("frozen", model.frozen)] + ([("loss_fn", outside)] if outside else [])
    names = [
        f"{prefix}.{name}"
        for prefix, module in ignored
        for name, _ in itertools.chain(module.named_parameters(), module.named_buffers())
    ]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
