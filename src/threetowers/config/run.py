"""The ``train`` and ``eval`` sections: the optimisation, the run directory, the benchmarks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from threetowers.config.base import Section


class EvalConfig(Section):
    """Benchmarks; left empty with the embedded world, its own sets are used."""

    retrieval: str | dict[str, str] | None = Field(
        None,
        description="A Karpathy-split JSON (dataset_flickr30k.json, ...), or several by name "
        "(the first is the primary set; another's metrics carry its name: i2t_NAME_R@1).",
    )
    retrieval_images: str | None = Field(
        None,
        description="The folder its entries' filepath/filename are relative to; null: the "
        "JSON's folder, or its flickr30k-images/ subfolder when the images are there.",
    )
    retrieval_split: str = Field("test", description="The split of the retrieval JSON.")
    zeroshot: dict[str, str] = Field(
        {}, description="Name -> class-folder root (with classnames.txt, templates.txt)."
    )
    zeroshot_split: str | None = Field("test", description="The class folders' split.")
    fewshot_shots: int = Field(
        10, ge=0, description="Few-shot examples per class, from the class folder's val split."
    )
    alpha_sweep: bool = Field(
        True, description="Also score 3t's mixtures of f's and the frozen towers' pairs."
    )
    val_data: str | None = Field(
        None,
        description="Held-out pairs of your own data (anything data.train accepts alone): the "
        "validation loss and retrieval on them at every evaluation (val_loss, val_i2t_R@1, ...).",
    )
    every: int = Field(0, ge=0, description="Steps between evaluations; 0: only at the end.")
    batch_size: int = Field(256, gt=0, description="Images or captions embedded at a time.")


class TrainConfig(Section):
    """The optimisation and the run directory."""

    steps: int = Field(1000, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, cosine schedule).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip; 0: off.")
    activation_checkpointing: bool = Field(
        False,
        description="Checkpoint each Transformer block of f and g: activation memory of one "
        "block's input per block, for a second forward of the towers in the backward pass. "
        "A resume may change it.",
    )
    micro_batch: int = Field(
        0,
        ge=0,
        description="Pairs per rank per pass; 0: the whole local batch. Smaller runs the towers "
        "a micro-batch at a time and accumulates the whole batch's gradients exactly "
        "(GradCache's way: embeddings first, the loss on all of them, then each micro-batch "
        "again with a graph), so activation memory follows micro_batch, not data.batch_size. "
        "A resume may change it (on smaller GPUs).",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How the trained parts spread over torchrun's ranks. ddp: a whole copy on "
        "every rank. fsdp: FSDP2, weights, gradients and Adam's state sharded over the ranks "
        "(each Transformer block, each tower and the rest), bf16 weights in the towers on CUDA "
        "under bf16 precision, checkpoints written a shard per rank (torch.distributed."
        "checkpoint) and resumable on another number of ranks. The frozen towers and the "
        "loss's scales stay whole on every rank.",
    )
    seed: int = Field(0, description="Seed of the weights and the data order.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA, fp32 on CPUs (where bf16 is slow); under auto "
        "a run whose config.yaml names fp32 or bf16 resumes in it. CUDA runs use TF32 for "
        "float32 matmuls.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when available, else cpu."
    )
    checkpoint_every: int = Field(200, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(3, gt=0, description="The newest checkpoints kept.")
    max_bad_steps: int = Field(
        10,
        gt=0,
        description="A step with a non-finite loss or gradient is skipped (no update); this "
        "many in a row stop the run: skipping changes no weight, so a streak over different "
        "batches means the state or the settings are broken.",
    )
    log_every: int = Field(10, gt=0, description="Steps between log lines.")
    run_dir: str = Field("runs/default", description="The run directory.")
    init_from: str | None = Field(
        None,
        description="Start a new run from another run's trained weights (those whose names "
        "and shapes fit): a run directory (its latest checkpoint) or one checkpoint "
        "(RUN/checkpoints/step_N).",
    )
    continued_from: list[PositiveInt] = Field(
        [],
        description="The train.steps a run was continued from, in order (a continuation "
        "records them; leave it out): the lr schedule restarts at each.",
    )

    @model_validator(mode="after")
    def _continued_before_the_end(self) -> TrainConfig:
        ends = [*self.continued_from, self.steps]
        if any(earlier >= later for earlier, later in zip(ends, ends[1:], strict=False)):
            raise ValueError(
                f"continued_from must be increasing steps below steps={self.steps}, got "
                f"{self.continued_from}; leave it out: a continuation records it"
            )
        return self
