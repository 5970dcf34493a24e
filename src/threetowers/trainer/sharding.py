"""``train.parallel: fsdp``: the trained parts sharded over the ranks with FSDP2.

Each Transformer block of f and g is one FSDP unit, each tower another (its embeddings,
norms and pooling), and the model the last (the heads): a unit's weights are gathered for
its forward and backward and dropped after, and every rank keeps only its shard of the
weights, gradients and Adam's state. Left whole on every rank, as ``ignored_params``: the
frozen towers (never trained, as under DDP) and the loss's scales and biases, which are
scalars FSDP cannot shard; the step averages their gradients itself.

Rank 0 evaluates alone, while the others wait outside the training collectives, on an
:class:`EvaluationCopy`: the model unsharded, its trained weights gathered into it for each
evaluation and parked on the CPU between them, its frozen towers the training model's own.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from threetowers import distributed
from threetowers.files.checkpoints import FROZEN_PREFIX
from threetowers.model.three_towers import ThreeTowers
from threetowers.towers.transformer import Block
from threetowers.trainer.checkpoint import trainable_state
from threetowers.trainer.precision import resolve_precision


def shard_model(model: ThreeTowers, precision: str, device: torch.device) -> None:
    """Shard ``model``'s trained parts over the ranks, in place (before its optimizer is
    made: the parameters become DTensors); nothing to do in one process. Under bf16 on CUDA
    the units compute with bf16 weights and reduce gradients in fp32."""
    if distributed.world_size() == 1:
        return
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and resolve_precision(precision, device.type) == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    towers = [tower for tower in (model.image_tower, model.text_tower) if tower is not None]
    for tower in towers:
        for block in (module for module in tower.modules() if isinstance(module, Block)):
            fully_shard(block, mp_policy=policy)
        fully_shard(tower, mp_policy=policy)
    whole = set(model.frozen.parameters()) | set(model.loss_fn.parameters())
    fully_shard(model, mp_policy=policy, ignored_params=whole)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_trainable_state(model: ThreeTowers) -> dict[str, torch.Tensor]:
    """The trained weights whole, on the CPU, on rank 0 (the other ranks get an empty dict);
    every rank calls it when the model is sharded."""
    if not is_sharded(model):
        return trainable_state(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {
        key: value.contiguous() for key, value in state.items() if not key.startswith(FROZEN_PREFIX)
    }


class EvaluationCopy:
    """Rank 0's unsharded copy of a model about to be sharded, for evaluation alone."""

    def __init__(self, model: ThreeTowers) -> None:
        self.device = next(model.parameters()).device
        # the frozen towers shared, not copied: they are never sharded nor trained
        self.model = copy.deepcopy(model, memo={id(model.frozen): model.frozen})
        self.parked()

    def filled(self, weights: dict[str, torch.Tensor]) -> ThreeTowers:
        """The copy on the device with ``weights`` (:func:`full_trainable_state`'s)."""
        self.model.load_state_dict(weights, strict=False)
        self._move(self.device)
        return self.model

    def parked(self) -> None:
        """On the CPU between evaluations: the device's memory is training's."""
        self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for name, child in self.model.named_children():
            if name != "frozen":
                child.to(device)
