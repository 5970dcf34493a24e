"""threetowers' clip training step against OpenCLIP's, on one architecture both express.

    PYTHONPATH=src .venv-interop/bin/python benchmarks/open_clip_step.py [--quick]

Runs in OpenCLIP's environment (`make .venv-interop/.built`; OpenCLIP cannot live in the
project's), threetowers imported from src/. The towers: ViT 64 px, patch 8, width 256, depth
6 (class-token pooling, OpenCLIP's tok); a causal text Transformer, context 32, width 256,
depth 6, end-of-text pooling; D = 256; batch 256; softmax loss with a learned scale; AdamW
with weight decay. Captions either fill the context ("full") or hold 8-24 of its 32 tokens
("realistic", the rest padding). The two steppers take turns step by step and each round's
throughput ratio is kept, so a slow moment of the machine weighs on both; the result is the
median ratio, with each side's MFU against the peak fp32 matmul measured in the same run.
Writes benchmarks/results/open_clip_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))

import matmul  # noqa: E402

import threetowers as tt  # noqa: E402
from threetowers.trainer.optim import make_optimizer  # noqa: E402

WIDTH, DEPTH, HEADS, EMBED = 256, 6, 4, 256
IMAGE, PATCH, CONTEXT, VOCAB, BATCH = 64, 8, 32, 8192, 256
LR, WEIGHT_DECAY = 1e-4, 0.1
OUT = Path(__file__).parent / "results" / "open_clip_step.json"


def ours() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    tower = {"width": WIDTH, "depth": DEPTH, "heads": HEADS}
    cfg = tt.load_config(
        None,
        [
            "model.mode=clip",
            f"model.embed_dim={EMBED}",
            *[f"model.image.{k}={v}" for k, v in tower.items()],
            f"model.image.image_size={IMAGE}",
            f"model.image.patch_size={PATCH}",
            "model.image.pool=cls",
            *[f"model.text.{k}={v}" for k, v in tower.items()],
            f"model.text.context_length={CONTEXT}",
            f"model.text.vocab_size={VOCAB}",
            "model.text.causal=true",
            "model.text.pool=eot",
        ],
    )
    model = tt.build_model(cfg)
    optimizer, _ = make_optimizer(model, LR, WEIGHT_DECAY, 1, 1000)
    return model, optimizer


def theirs() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg={
            "image_size": IMAGE,
            "patch_size": PATCH,
            "width": WIDTH,
            "layers": DEPTH,
            "head_width": WIDTH // HEADS,
            "pool_type": "tok",
        },
        text_cfg={
            "context_length": CONTEXT,
            "vocab_size": VOCAB,
            "width": WIDTH,
            "heads": HEADS,
            "layers": DEPTH,
            "pool_type": "eos",
            "eos_id": 2,
        },
    )
    # OpenCLIP's trainer: no decay on gains, biases, embeddings' scale and logit_scale.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0}]
    return model, torch.optim.AdamW(groups, lr=LR)


def captions(realistic: bool, generator: torch.Generator) -> torch.Tensor:
    """[BOS] tokens [EOS] then padding: 32 real tokens, or 8-24."""
    lengths = (
        torch.randint(8, 25, (BATCH,), generator=generator)
        if realistic
        else torch.full((BATCH,), CONTEXT)
    )
    tokens = torch.randint(4, VOCAB, (BATCH, CONTEXT), generator=generator)
    positions = torch.arange(CONTEXT)[None, :]
    tokens[:, 0] = 1
    tokens[positions == lengths[:, None] - 1] = 2
    tokens[positions >= lengths[:, None]] = 0
    return tokens


class Stepper:
    def __init__(self, name: str, model, optimizer, images, tokens) -> None:
        self.name, self.model, self.optimizer = name, model, optimizer
        self.images, self.tokens = images, tokens
        self.clip_loss = open_clip.ClipLoss() if name == "open_clip" else None

    def forward_backward(self) -> None:
        if self.clip_loss is None:
            loss, _ = self.model.loss(self.model(self.images, self.tokens))
        else:
            image, text, scale = self.model(self.images, self.tokens)
            loss = self.clip_loss(image, text, scale)
        loss.backward()

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.forward_backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def measure(repeats: int, warmup: int = 2) -> dict:
    peak = matmul.peak_matmul_gflops(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
    tokens = {kind: captions(kind == "realistic", generator) for kind in ("full", "realistic")}
    steppers = {}
    for kind in tokens:
        for name, make in (("threetowers", ours), ("open_clip", theirs)):
            torch.manual_seed(0)
            steppers[(kind, name)] = Stepper(name, *make(), images, tokens[kind])
    times: dict = {key: [] for key in steppers}
    for round_ in range(warmup + repeats):
        for key, stepper in steppers.items():
            seconds = stepper.timed_step()
            if round_ >= warmup:
                times[key].append(seconds)
    out: dict = {
        "peak_matmul_gflops": peak,
        "threads": torch.get_num_threads(),
        "open_clip": open_clip.__version__,
        "torch": torch.__version__,
        "repeats": repeats,
    }
    for kind in tokens:
        for name in ("threetowers", "open_clip"):
            stepper, seconds = steppers[(kind, name)], statistics.median(times[(kind, name)])
            flops = stepper.flops()
            out[f"{kind}_{name}"] = {
                "step_seconds": seconds,
                "pairs_per_s": BATCH / seconds,
                "flops_per_step": flops,
                "mfu": flops / seconds / 1e9 / peak,
            }
        rounds = zip(times[(kind, "open_clip")], times[(kind, "threetowers")], strict=True)
        out[f"throughput_ratio_{kind}"] = statistics.median(a / b for a, b in rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 15")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results = measure(3 if args.quick else 15)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"peak fp32 matmul {results['peak_matmul_gflops']:.0f} GFLOP/s")
    for kind in ("full", "realistic"):
        a, b = results[f"{kind}_threetowers"], results[f"{kind}_open_clip"]
        print(
            f"{kind:>9}: threetowers {a['pairs_per_s']:6.0f} pairs/s (MFU {a['mfu']:.0%}), "
            f"OpenCLIP {b['pairs_per_s']:6.0f} (MFU {b['mfu']:.0%}): "
            f"{results[f'throughput_ratio_{kind}']:.2f}x"
        )


if __name__ == "__main__":
    main()
