"""A model's embeddings of benchmark images and texts, batch by batch: every image-side
embedding (z_f and each frozen tower's) of image files or prepared inputs, every text-side
one of captions.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from threetowers.data.benchmarks import collate_images
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation.inputs import EvalCache, ImageInput, image_inputs
from threetowers.model.three_towers import ThreeTowers


@torch.no_grad()
def embed_images(
    model: ThreeTowers,
    paths,
    batch_size: int = 256,
    bad_images: BadSampleLog | None = None,
    cache: EvalCache | None = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Every image-side embedding of ``model`` (z_f and/or z_h) for image files.

    Images that cannot be used are skipped (and recorded in ``bad_images``): ``"index"``
    holds the positions in ``paths`` of the rows that were embedded. With ``cache``, the
    views and the frozen towers' features are made once and read from there (the same
    embeddings).
    ``num_workers`` loader processes read the rows (in order: the same embeddings).
    """
    inputs = image_inputs(model, paths, batch_size, cache)
    example = f"e.g. {paths[0]}" if len(paths) else ""
    return embed_inputs(model, inputs, batch_size, bad_images, num_workers, example)


@torch.no_grad()
def embed_inputs(
    model: ThreeTowers,
    inputs: dict[str, ImageInput],
    batch_size: int = 256,
    bad_images: BadSampleLog | None = None,
    num_workers: int = 0,
    example: str = "",
) -> dict[str, torch.Tensor]:
    """:func:`embed_images` on inputs made already (``image_inputs``, ``decoded_inputs``)."""
    device = next(p for p in model.parameters()).device
    loaders = {
        name: DataLoader(
            put.rows, batch_size=batch_size, collate_fn=collate_images, num_workers=num_workers
        )
        for name, put in inputs.items()
    }
    chunks: dict[str, list[torch.Tensor]] = {"index": []}
    for batches in zip(*loaders.values(), strict=True):
        indices, _, skipped = batches[0]  # every input reads the same files
        if bad_images is not None:
            bad_images.record(len(indices), skipped)
        if not len(indices):
            continue
        chunks["index"].append(indices)
        arguments: dict = {"images": None, "frozen_features": {}, "frozen_images": {}}
        for name, (_, rows, _) in zip(loaders, batches, strict=True):
            tensor = inputs[name].prepare(rows).to(device)
            argument, _, tower = name.partition("/")  # frozen_features/NAME -> its dict
            if tower:
                arguments[argument][tower] = tensor
            else:
                arguments[argument] = tensor
        for key, value in model.image_embeddings(**arguments).items():
            chunks.setdefault(key, []).append(value.float().cpu())
    if not chunks["index"]:
        rows = len(next(iter(inputs.values())).rows)
        raise BadDataError(f"none of the {rows} images could be used {example}".rstrip())
    return {key: torch.cat(values) for key, values in chunks.items()}


@torch.no_grad()
def embed_texts(model: ThreeTowers, tokenizer: CaptionTokenizer, texts, batch_size: int = 256):
    device = next(p for p in model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(texts), batch_size):
        captions = list(texts[start : start + batch_size])
        tokens = tokenizer.encode(captions).to(device)
        for key, value in model.text_embeddings(tokens, captions).items():
            chunks.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in chunks.items()}
