"""trainer/precision.py: train.precision resolved for a device (auto: fp32 on the CPU, bf16
on CUDA), the autocast it implies as a forward's dtypes show it, and TF32 on CUDA alone."""

from __future__ import annotations

import pytest
import torch

import threetowers as tt
from threetowers.trainer.precision import autocast, resolve_precision, use_tf32

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("precision", "device", "resolved"),
    [
        ("auto", CPU, "fp32"),
        ("auto", CUDA, "bf16"),
        ("auto", "cuda:1", "bf16"),  # a torchrun rank's own GPU
        ("fp32", CUDA, "fp32"),
        ("bf16", CPU, "bf16"),
    ],
)
def test_precision_resolves_for_the_device(precision, device, resolved):
    assert resolve_precision(precision, device) == resolved


def test_the_default_precision_is_auto():
    assert tt.load_config("tiny").train.precision == "auto"


def linear_output_dtypes(model: torch.nn.Module, precision: str, device: torch.device) -> set:
    """The dtypes every Linear of ``model`` computes in, over one forward under ``precision``."""
    seen = set()
    hooks = [
        module.register_forward_hook(lambda _module, _inputs, out: seen.add(out.dtype))
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    cfg = tt.load_config("tiny", ["model.mode=clip"])
    size, context = cfg.model.image.image_size, cfg.model.text.context_length
    images = torch.randn(2, 3, size, size, device=device)
    tokens = torch.randint(1, cfg.model.text.vocab_size, (2, context), device=device)
    with autocast(precision, device):
        model(images, tokens)
    for hook in hooks:
        hook.remove()
    return seen


def tiny_clip(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return tt.build_model(tt.load_config("tiny", ["model.mode=clip"]), device=device)


def test_auto_runs_a_cpu_forward_in_float32():
    model = tiny_clip(CPU)
    assert linear_output_dtypes(model, "auto", CPU) == {torch.float32}
    assert linear_output_dtypes(model, "bf16", CPU) == {torch.bfloat16}


def test_tf32_is_left_alone_off_cuda():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    use_tf32(CPU)
    after = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    assert after == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_runs_a_cuda_forward_in_bf16_and_fp32_stays_float32():
    model = tiny_clip(CUDA)
    assert linear_output_dtypes(model, "auto", CUDA) == {torch.bfloat16}
    assert linear_output_dtypes(model, "fp32", CUDA) == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_turns_tf32_on():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        use_tf32(CUDA)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
