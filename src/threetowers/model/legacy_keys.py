"""The parameter names of earlier checkpoints, renamed to today's so that they still load,
resume, start runs (train.init_from) and export.

Before issue 39 ThreeTowers held its loss module as ``objective`` (now ``loss_fn``), so the
learned scales and biases were saved as ``objective.log_scale.*`` and ``objective.bias.*``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

RENAMED_PREFIXES = {"objective.": "loss_fn."}


def renamed_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every earlier name replaced by today's."""
    renamed = {}
    for key, value in state.items():
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        renamed[key] = value
    return renamed


def rename_legacy_keys(state: dict, prefix: str, *_: object) -> None:
    """A load_state_dict pre-hook: the keys under ``prefix`` renamed in place."""
    ours = [key for key in state if key.startswith(prefix)]
    local = {key.removeprefix(prefix): state.pop(key) for key in ours}
    state.update({prefix + key: value for key, value in renamed_legacy_keys(local).items()})
