"""Validation on held-out pairs of the user's own data (``eval.val_data``): the training
loss, and retrieval with every caption of a sample one of its positives, so that a run on
data without a Karpathy JSON or class folders still shows its progress.

The pairs go through the training loader with fixed views (no augmentation, every frozen
tower live), one caption drawn per sample as in training, at ``eval.batch_size``: the loss
is training's at that batch size. Retrieval embeds each usable sample's image once and all
of its captions (``val_i2t_R@k``, ``val_t2i_R@k``, the deployed pair of the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation import metrics
from threetowers.evaluation.embedding import embed_texts
from threetowers.model.three_towers import ThreeTowers, batch_embeddings


@torch.no_grad()
def validate(
    model: ThreeTowers,
    tokenizer: CaptionTokenizer,
    batches: Iterable[dict],
    captions: dict[str, list[str]],
    on_device: Callable[[dict], dict],
) -> dict[str, float]:
    """``val_loss`` (the mean over samples of the batches' losses) and ``val_*`` retrieval.
    ``batches``: prepared loader batches; ``captions``: every caption of each sample by id;
    ``on_device`` moves a batch to the model's device."""
    was_training = model.training
    model.eval()
    try:
        return _validate(model, tokenizer, batches, captions, on_device)
    finally:
        model.train(was_training)


def _validate(model, tokenizer, batches, captions, on_device) -> dict[str, float]:
    image_key, text_key = model.image_key, model.structure.text_key
    loss_sum, images, ids = 0.0, [], []
    for batch in batches:
        if not batch["ids"]:
            continue
        out = batch_embeddings(model, on_device(batch))
        loss_sum += float(model.loss(out)[0]) * len(batch["ids"])
        images.append(out[image_key].float().cpu())
        ids += batch["ids"]
    if not ids:
        return {}
    texts = [text for sample_id in ids for text in captions[sample_id]]
    owners = torch.repeat_interleave(
        torch.arange(len(ids)), torch.tensor([len(captions[sample_id]) for sample_id in ids])
    )
    found = metrics.retrieval(
        torch.cat(images), embed_texts(model, tokenizer, texts)[text_key], owners
    )
    return {"val_loss": loss_sum / len(ids)} | {f"val_{key}": value for key, value in found.items()}
