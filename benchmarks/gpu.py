"""One GPU measured for training at paper scale B, in at most 8 minutes on an H100.

    .venv/bin/python benchmarks/gpu.py            # -> results/gpu_<device-name>.json
    .venv/bin/python benchmarks/gpu.py --smoke    # every part at toy sizes on the CPU, < 1 min

The parts, each under its own time budget; a part that fails or runs out of time is recorded
in the JSON (its error) and the next one runs; the JSON is rewritten after every part:

- **peak**: the bf16 matmul peak measured here, MFU's denominator (and TF32's, for scale).
- **steps**: the ``b16`` preset's towers (ViT-B/16 at 224 px, B text tower) stepping one GPU's
  share of its batch (512 pairs) in bf16 through ``trainer.step.TrainStep``: clip, 3t with h's
  features cached and 3t with EfficientNet-Lite0 live. Step time (median), pairs/s, model
  FLOPs per step (torch's FlopCounterMode; a live h's forward included), MFU, peak memory.
- **input_path**: training's loader (``TrainingData.batches``) with every core but the main
  process's as a worker, on JPEG shards of real photographs (``input_path.write_shards``,
  hard-linked to many shards), in pairs/s against the steps' pairs/s: what one GPU consumes.
- **cache_build**: h's feature cache of the same shards built by ``TrainingData`` (the tower
  on this device), in images/s.
- **open_clip**: OpenCLIP's step on the same towers, where ``open_clip`` is importable.
- **micro_batches**: the ``b16`` preset's clip step at CLIP's global batch of 32768 pairs on
  this one device through ``train.micro_batch`` (512 and 256 pairs a pass, each without and
  with ``train.activation_checkpointing``; the loss 1024 rows at a time): one timed step
  each, its peak memory, pairs/s (also against the plain 512-pair clip step), and the memory
  the whole batch in one pass would need. A setting out of device memory is recorded as
  skipped and the next runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))

from input_path import write_shards  # noqa: E402
from matmul import peak_matmul_gflops  # noqa: E402

import threetowers as tt  # noqa: E402
from threetowers.data.device import on_device  # noqa: E402
from threetowers.data.pipeline import TrainingData, open_data  # noqa: E402
from threetowers.data.stream import GlobalBatch  # noqa: E402
from threetowers.data.views import Views  # noqa: E402
from threetowers.trainer.optim import make_optimizer  # noqa: E402
from threetowers.trainer.precision import use_tf32  # noqa: E402
from threetowers.trainer.run_dir import environment  # noqa: E402
from threetowers.trainer.start import towers_of  # noqa: E402
from threetowers.trainer.step import TrainStep  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOY_TOWERS = (  # --smoke's: b16's structure at a CPU's size
    "model.embed_dim=32",
    "model.image.image_size=32",
    "model.image.patch_size=8",
    "model.image.width=64",
    "model.image.depth=1",
    "model.image.heads=2",
    "model.text.vocab_size=512",
    "model.text.context_length=16",
    "model.text.width=64",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.frozen.0.image_size=32",
)
VARIANTS = {"clip": ("clip", False), "3t_cached": ("3t", True), "3t_live": ("3t", False)}


@dataclass(frozen=True)
class Sizes:
    """What a run measures at: one H100's share of b16, or --smoke's toys on the CPU."""

    towers: tuple[str, ...]  # overrides of the b16 preset's towers
    batch: int  # pairs a step
    steps: int  # timed steps a variant, after `warmup` untimed ones
    warmup: int
    matmul: int  # the peak matmul's size
    photos: int  # distinct JPEG pairs written (shards of 200) ...
    links: int  # ... and hard-linked this many times over: what the input path reads
    global_batch: int  # micro_batches' step: a global batch on one device ...
    micro_batches: tuple[int, ...]  # ... through micro-batches of these sizes
    loss_block: int  # ... with the loss this many rows at a time (docs/distributed.md)
    budgets: dict  # seconds each part may take


FULL = Sizes(
    towers=(),
    batch=512,
    steps=10,
    warmup=3,
    matmul=8192,
    photos=1600,
    links=20,
    global_batch=32768,  # CLIP's
    micro_batches=(512, 256),
    loss_block=1024,
    budgets={
        "peak": 15,
        "clip": 45,
        "3t_cached": 45,
        "3t_live": 60,
        "input_path": 90,
        "cache_build": 45,
        "open_clip": 40,
        "micro_batches": 90,  # 4 steps of 32k pairs, ~15-20 s each at 40% MFU
    },  # 430 s, leaving a minute for the start and the imports
)
SMOKE = Sizes(
    towers=TOY_TOWERS,
    batch=16,
    steps=2,
    warmup=1,
    matmul=256,
    photos=200,
    links=2,
    global_batch=64,
    micro_batches=(32, 16),
    loss_block=16,
    budgets={
        "peak": 5,
        "clip": 8,
        "3t_cached": 8,
        "3t_live": 8,
        "input_path": 12,
        "cache_build": 12,
        "open_clip": 5,
        "micro_batches": 15,
    },  # 73 s
)


class OverBudget(Exception):
    """A part ran past its time budget."""


@contextlib.contextmanager
def budget(seconds: float):
    """Raise :class:`OverBudget` in whatever the part is doing after ``seconds``."""

    def expire(*_):
        raise OverBudget(f"over its {seconds:g} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def b16(sizes: Sizes, *overrides: str) -> tt.Config:
    """The b16 preset at ``sizes``, in bf16 (auto's choice on CUDA, asked for outright)."""
    return tt.load_config("b16", [*sizes.towers, "train.precision=bf16", *overrides])


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, sizes: Sizes, device: torch.device) -> list[float]:
    """Seconds of each of ``sizes.steps`` calls of ``step`` after ``sizes.warmup``."""
    times = []
    for i in range(sizes.warmup + sizes.steps):
        synchronise(device)
        start = time.perf_counter()
        step()
        synchronise(device)
        if i >= sizes.warmup:
            times.append(time.perf_counter() - start)
    return times


def peak(sizes: Sizes, device: torch.device) -> dict:
    return {
        "bf16_gflops": peak_matmul_gflops(device, sizes.matmul, 20, torch.bfloat16),
        "fp32_gflops": peak_matmul_gflops(device, sizes.matmul, 20),  # TF32 on CUDA
    }


def synthetic_batch(model, cfg: tt.Config, cached: bool, device: torch.device) -> dict:
    """A step's tensors as the stream hands them: normalised images, tokens trimmed to
    two thirds of the context (a typical batch's longest caption), h's features or view.
    Drawn on ``device``, no host copy (32k normalised images of 224 px are 20 GB)."""
    generator = torch.Generator(device).manual_seed(0)
    batch, context = cfg.data.batch_size, cfg.model.text.context_length
    size = cfg.model.image.image_size
    vocab = cfg.model.text.vocab_size
    tokens = torch.randint(4, vocab, (batch, context), generator=generator, device=device)
    tensors = {
        "images": torch.randn(batch, 3, size, size, generator=generator, device=device),
        "tokens": tokens[:, : context * 2 // 3],
        "captions": [""] * batch,
    }
    for name, tower in model.frozen.items():
        size = tower.preprocessing.image_size
        view = torch.randn(batch, 3, size, size, generator=generator, device=device)
        if cached:
            with torch.no_grad():  # as a cache's rows: no inference-mode tensor in the graph
                tensors.setdefault("frozen_features", {})[name] = tower(view).float()
        else:
            tensors.setdefault("frozen_images", {})[name] = view
    return tensors


def step_of(variant: str, sizes: Sizes, device: torch.device) -> dict:
    mode, cached = VARIANTS[variant]
    cfg = b16(sizes, f"model.mode={mode}", f"data.batch_size={sizes.batch}")
    torch.manual_seed(0)
    model = tt.build_model(cfg, device=device)
    train = cfg.train
    optimizer, schedule = make_optimizer(
        model, train.lr, train.weight_decay, train.warmup_steps, train.steps
    )
    step = TrainStep(model, optimizer, schedule, device, train)
    batch = GlobalBatch(synthetic_batch(model, cfg, cached, device), [sizes.batch], False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(lambda: step(batch), sizes, device)
    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    seconds, flops = statistics.median(times), counter.get_total_flops()
    out = {
        "step_seconds": seconds,
        "pairs_per_s": sizes.batch / seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "step_times": times,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def micro_batches(sizes: Sizes, device: torch.device) -> dict:
    """The b16 preset's clip step at ``sizes.global_batch`` pairs on this one device through
    ``train.micro_batch``, at each of ``sizes.micro_batches`` without and then with
    activation checkpointing. A setting that runs out of device memory is recorded as
    skipped and the next one runs; those the part's budget leaves no time for, as cut off."""
    part = {
        "global_batch": sizes.global_batch,
        "loss_block_size": sizes.loss_block,
        "settings": {},
        "measures": "one timed step of the whole global batch, after a warm-up step of two "
        "micro-batches (the same kernels); before: the device memory allocated as the step "
        "began (weights, gradients, AdamW's state, the batch, its images uint8); "
        "peak: torch.cuda.max_memory_allocated over the step; whole_batch_memory_estimate: "
        "before + the step's own memory scaled from one micro-batch to the whole batch, what "
        "micro_batch 0 would need (an upper estimate: the whole batch's embeddings in it do "
        "not grow)",
    }
    try:
        for checkpointing in (False, True):
            measure_micro_batches(sizes, device, checkpointing, part)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except OverBudget as error:  # what was measured stands
        for checkpointing in (False, True):
            for micro in sizes.micro_batches:
                name = setting_name(micro, checkpointing)
                part["settings"].setdefault(name, {"skipped": f"the part ran {error}"})
    return part


def setting_name(micro: int, checkpointing: bool) -> str:
    return f"micro_batch_{micro}" + ("_checkpointed" if checkpointing else "")


def measure_micro_batches(
    sizes: Sizes, device: torch.device, checkpointing: bool, part: dict
) -> None:
    """Into ``part``: one model's step at each micro-batch size (the model, its AdamW state
    and the batch shared, as steps of one run would share them)."""

    def config(micro: int) -> tt.Config:
        return b16(
            sizes,
            "model.mode=clip",
            f"data.batch_size={sizes.global_batch}",
            # else the plain 32k x 32k float32 logits (4 GiB each), not the towers, set the peak
            f"loss.block_size={sizes.loss_block}",
            f"train.micro_batch={micro}",
            f"train.activation_checkpointing={str(checkpointing).lower()}",
        )

    cfg = config(0)
    torch.manual_seed(0)
    model = tt.build_model(cfg, device=device)
    train = cfg.train
    optimizer, schedule = make_optimizer(
        model, train.lr, train.weight_decay, train.warmup_steps, train.steps
    )
    tensors = synthetic_batch(model, cfg, False, device)
    # as the stream hands a micro-batched step its batch: uint8, each micro-batch's views
    # normalised as its pass reaches it
    shape = tensors["images"].shape
    tensors["images"] = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    views = Views(normalise=model.image_preprocessing.normalize_pixels)
    part["batch_gib"] = sum(t.nbytes for t in tensors.values() if torch.is_tensor(t)) / 2**30
    for micro in sizes.micro_batches:
        step = TrainStep(model, optimizer, schedule, device, config(micro).train, views)
        name = setting_name(micro, checkpointing)
        try:
            part["settings"][name] = accumulated_step(step, tensors, micro, device)
        except torch.OutOfMemoryError as error:
            part["settings"][name] = {"skipped": f"out of device memory: {error}".split("\n")[0]}
        # after the except block, which kept the failed step's tensors alive
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def accumulated_step(step: TrainStep, tensors: dict, micro: int, device: torch.device) -> dict:
    """One timed step of all of ``tensors`` (after one of their first two micro-batches)."""
    warm = 2 * micro
    step(GlobalBatch({key: value[:warm] for key, value in tensors.items()}, [warm], False))
    synchronise(device)
    pairs = len(tensors["tokens"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    step(GlobalBatch(tensors, [pairs], False))
    synchronise(device)
    seconds = time.perf_counter() - start
    out = {
        "micro_batch": micro,
        "micro_batches_per_step": -(-pairs // micro),
        "step_seconds": seconds,
        "pairs_per_s": pairs / seconds,
        # none on the CPU, where benchmarks/accumulation.py measures it in fresh processes
        "before_gib": None,
        "peak_memory_gib": None,
        "peak_reserved_gib": None,
        "whole_batch_memory_estimate_gib": None,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out["before_gib"] = before / 2**30
        out["peak_memory_gib"] = peak / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        out["whole_batch_memory_estimate_gib"] = (before + (peak - before) * pairs / micro) / 2**30
    return out


def shards(sizes: Sizes, folder: Path) -> int:
    """``sizes.photos`` JPEG pairs written as shards, then hard-linked ``sizes.links`` times
    over (keys repeat across shards, as shards written apart may: ids are SHARD/KEY)."""
    written, linked = folder / "written", folder / "shards"
    write_shards(written, sizes.photos)
    linked.mkdir()
    for copy in range(sizes.links):
        for shard in sorted(written.glob("*.tar")):
            os.link(shard, linked / f"{copy:03d}-{shard.name}")
    return sizes.photos * sizes.links


def cores() -> int:
    return len(os.sched_getaffinity(0))


def loader_config(sizes: Sizes, folder: Path, *overrides: str) -> tt.Config:
    """Training data of ``folder``'s shards, read with every core but the main process's."""
    workers = max(1, cores() - 1)
    return b16(
        sizes,
        f"data.train={folder / 'shards'}",
        f"data.batch_size={sizes.batch}",
        f"data.num_workers={workers}",
        f"data.cache_dir={folder / 'cache'}",
        *overrides,
    )


def input_path(sizes: Sizes, folder: Path, device: torch.device, deadline: float) -> dict:
    """Training's batches as its stream hands them to the step (clip: f's random resized
    crops, tokenised; pinned, copied one batch ahead and normalised on ``device``), timed
    after the first batch (the workers' start) until the data or ``deadline`` runs out."""
    samples = shards(sizes, folder)
    cfg = loader_config(sizes, folder, "model.mode=clip")
    with torch.device("meta"):  # the loader needs the towers' views, not their weights
        towers = towers_of(tt.build_model(cfg))
    data = TrainingData(cfg, open_data(cfg, folder / "run"), towers, progress=False)
    stream = data.stream(0, 0, pin_memory=device.type == "cuda")
    batches = on_device(stream, device, data.views)
    next(batches)
    wall, cpu, pairs = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        pairs += len(batch["ids"])
        if batch["position"][0] > 0 or time.perf_counter() > deadline:
            break
    synchronise(device)
    seconds, main_cpu = time.perf_counter() - wall, time.process_time() - cpu
    batches.close()
    stream.close()  # its workers end now, not when collected
    return {
        "samples_in_shards": samples,
        "pairs_read": pairs,
        "workers": cfg.data.num_workers,
        "pairs_per_s": pairs / seconds,
        "pairs_per_s_per_worker": pairs / seconds / cfg.data.num_workers,
        "main_process_us_per_pair": main_cpu / pairs * 1e6,
        "measures": "TrainingData.stream through data.device.on_device: uint8 batches, "
        "tokenised in the main process, pinned, copied and normalised on the device",
    }


def cache_build(sizes: Sizes, folder: Path, device: torch.device) -> dict:
    """h's cache of the input path's shards, built from scratch by TrainingData."""
    cfg = loader_config(sizes, folder, "model.mode=3t", "data.cache=true")
    model = tt.build_model(cfg, device=device)
    opened = open_data(cfg, folder / "run_3t")
    synchronise(device)
    start = time.perf_counter()
    TrainingData(cfg, opened, towers_of(model), progress=False)
    synchronise(device)
    seconds = time.perf_counter() - start
    images = sizes.photos * sizes.links
    (tower,) = model.frozen.values()
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "workers": cfg.data.num_workers,
        "tower": f"{cfg.model.frozen[0].backbone} at {tower.preprocessing.image_size} px",
        "cache_precision": cfg.data.model_dump().get("cache_precision", "fp32"),
    }


def open_clip_step(sizes: Sizes, device: torch.device) -> dict:
    """OpenCLIP's CLIP with b16's towers (mean-pooled image tokens, end-of-text pooling),
    bf16 autocast, fused AdamW where on CUDA, its ClipLoss; captions fill the context."""
    try:
        import open_clip
    except ImportError as error:
        return {"skipped": f"open_clip is not importable here ({error}); make .venv-interop"}
    cfg = b16(sizes)
    image, text = cfg.model.image, cfg.model.text
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=cfg.model.embed_dim,
        vision_cfg={
            "image_size": image.image_size,
            "patch_size": image.patch_size,
            "width": image.width,
            "layers": image.depth,
            "head_width": image.width // image.heads,
            "mlp_ratio": image.mlp_ratio,
            "pool_type": "avg",
        },
        text_cfg={
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.depth,
        },
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(0)
    size = image.image_size
    images = torch.randn(sizes.batch, 3, size, size, generator=generator).to(device)
    tokens = torch.randint(4, text.vocab_size, (sizes.batch, text.context_length)).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        optimizer.step()

    times = timed(step, sizes, device)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = statistics.median(times)
    return {
        "open_clip": open_clip.__version__,
        "step_seconds": seconds,
        "pairs_per_s": sizes.batch / seconds,
        "flops_per_step": counter.get_total_flops(),
    }


def device_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def derived(report: dict) -> None:
    """MFU against this run's bf16 peak, and the ratios the parts are read by."""
    peak_gflops = report.get("peak", {}).get("bf16_gflops")
    steps = {name: report[name] for name in VARIANTS if "step_seconds" in report.get(name, {})}
    for part in [*steps.values(), report.get("open_clip", {})]:
        if peak_gflops and "flops_per_step" in part:
            part["mfu"] = part["flops_per_step"] / part["step_seconds"] / 1e9 / peak_gflops
    if "clip" in steps:
        clip = steps["clip"]["step_seconds"]
        for name in ("3t_cached", "3t_live"):
            if name in steps:
                report[f"step_time_ratio_{name}_vs_clip"] = steps[name]["step_seconds"] / clip
        if "step_seconds" in report.get("open_clip", {}):
            report["open_clip_vs_clip_pairs_per_s"] = (
                report["open_clip"]["pairs_per_s"] / steps["clip"]["pairs_per_s"]
            )
    loader = report.get("input_path", {}).get("pairs_per_s")
    for name, part in steps.items():
        if loader:
            report[f"input_path_vs_{name}_consumption"] = loader / part["pairs_per_s"]
    if "clip" in steps:  # what accumulating a 32k batch costs against plain 512-pair steps
        for setting in report.get("micro_batches", {}).get("settings", {}).values():
            if "pairs_per_s" in setting:
                setting["pairs_per_s_vs_clip"] = (
                    setting["pairs_per_s"] / steps["clip"]["pairs_per_s"]
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, < 1 min")
    parser.add_argument("--out", type=Path, help="default: results/gpu_<device-name>.json")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device is visible; --smoke runs the parts on the CPU")
    use_tf32(device)  # as a training run on this device sets it
    name = device_name(device)
    out = args.out or (
        Path(tempfile.gettempdir()) / "gpu_smoke.json"
        if args.smoke
        else RESULTS / f"gpu_{name}.json"
    )
    report = {
        "device": name,
        "smoke": args.smoke,
        "cores": cores(),
        "batch_per_step": sizes.batch,
        "environment": environment(),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        parts = {
            "peak": lambda: peak(sizes, device),
            **{variant: (lambda v=variant: step_of(v, sizes, device)) for variant in VARIANTS},
            "input_path": lambda: input_path(
                sizes, folder, device, time.perf_counter() + sizes.budgets["input_path"] * 0.5
            ),
            "cache_build": lambda: cache_build(sizes, folder, device),
            "open_clip": lambda: open_clip_step(sizes, device),
            "micro_batches": lambda: micro_batches(sizes, device),  # last: the most memory
        }
        for part, measure in parts.items():
            begun = time.perf_counter()
            try:
                with budget(sizes.budgets[part]):
                    report[part] = measure()
            except Exception as error:  # recorded, and the next part runs
                report[part] = {"error": f"{type(error).__name__}: {error}"}
                report[part]["traceback"] = traceback.format_exc(limit=-4)
            report[part]["part_seconds"] = time.perf_counter() - begun
            gc.collect()
            for worker in multiprocessing.active_children():
                # what a part cut short left: loader workers ignore SIGTERM
                # (workers.ignore_sigterm), so the exit's terminate() would wait for ever
                worker.kill()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            derived(report)
            report["seconds"] = time.perf_counter() - started
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"{part}: {json.dumps(report[part])[:300]}", flush=True)
    print(f"{out} written in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
