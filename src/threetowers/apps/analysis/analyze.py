"""``threetowers analyze RUN``: how the run's embeddings differ (the paper's outlook).

- Linear CKA between every pair of the run's embeddings of the world's test images and
  their first captions: z_f, z_f->k, z_k (image side) and z_g, z_g->k (text side), and a
  frozen pair p's own embeddings, "p own image" and "p own text" (u_pimg, u_ptxt), so one
  sees, for instance, whether f's head towards h reproduces h's own embedding or f's.
- A linear probe per attribute of the world on each image embedding: fitted on the
  validation images (the val pairs and the retrieval val set), scored on the test images.
  Object class, colour, size and position are those of the one object of single-object
  images; count and place hold for every image. The probe is :func:`fit_probe`, the
  few-shot probe's ridge classifier with λ by leave-one-out, here on every training image.

Writes ``analysis.json`` and ``analysis.png`` to ``OUT`` (default ``RUN/analysis``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from threetowers.apps.analysis.attributes import ATTRIBUTES, Samples, world_samples
from threetowers.apps.analysis.cka import linear_cka
from threetowers.evaluation.embedding import embed_inputs, embed_texts
from threetowers.evaluation.inputs import decoded_inputs
from threetowers.evaluation.metrics import fit_probe
from threetowers.files.atomic import write_atomic
from threetowers.model.objective import Z_F, Z_G, alignment_names, embedding
from threetowers.model.trained import TrainedRun, load_trained

PROBE_TRAIN = ("val", "retrieval_val")
PROBE_TEST = ("retrieval_test",)


def labels(model) -> tuple[dict[str, str], dict[str, str]]:
    """Embedding key -> its name in the report, for the image side (z_f, z_f->k, z_k) and
    the text side (z_g, z_g->k); a frozen text tower t has z_f->t on the image side and z_t
    on the text side; a frozen pair p adds its own embeddings (u_pimg, u_ptxt) as "p own
    image" and "p own text"."""
    aligned = model.structure.aligned
    image = {Z_F: "z_f"} if model.image_tower is not None else {}
    text = {Z_G: "z_g"} if model.text_tower is not None else {}
    for name in aligned:
        on_f, on_g = alignment_names(name)
        if model.image_tower is not None:
            image[embedding(on_f)] = f"z_f->{name}"
        if name in model.structure.text:
            text[embedding(name)] = f"z_{name}"
        elif model.text_tower is not None:
            text[embedding(on_g)] = f"z_g->{name}"
    for name in model.structure.image_towers:
        image[embedding(name)] = f"z_{name}"
    for pair in model.structure.pairs:
        own_image, own_text = model.structure.pair(pair)
        image[own_image], text[own_text] = f"{pair} own image", f"{pair} own text"
    return image, text


def embeddings(run: TrainedRun, samples: Samples, batch_size: int) -> dict[str, torch.Tensor]:
    """name -> the run's embedding of every sample (images, or their first captions)."""
    model = run.model
    with torch.no_grad():
        found = embed_inputs(model, decoded_inputs(model, samples.images), batch_size)
        found |= embed_texts(model, run.tokenizer, samples.captions, batch_size)
    image, text = labels(model)
    return {label: found[key] for key, label in (image | text).items()}


def cka_matrix(vectors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    names = list(vectors)
    return {a: {b: linear_cka(vectors[a], vectors[b]) for b in names} for a in names}


def probe_accuracy(
    train: torch.Tensor, train_labels: list, test: torch.Tensor, test_labels: list
) -> float:
    """Top-1 (%) of a probe fitted on the rows whose label is defined, on those of test."""
    keep = [i for i, label in enumerate(train_labels) if label is not None]
    held = [i for i, label in enumerate(test_labels) if label is not None]
    classes = sorted({train_labels[i] for i in keep})
    code = {name: c for c, name in enumerate(classes)}
    y = torch.tensor([code[train_labels[i]] for i in keep])
    # a test label the probe never saw counts as an error (-1 matches no class)
    y_test = torch.tensor([code.get(test_labels[i], -1) for i in held])
    return fit_probe(train[keep], y).accuracy(test[held], y_test)


def majority(train_labels: list, test_labels: list) -> float:
    """The accuracy (%) of always answering the training set's most common label."""
    common, _ = Counter(x for x in train_labels if x is not None).most_common(1)[0]
    held = [x for x in test_labels if x is not None]
    return 100.0 * sum(x == common for x in held) / len(held)


def analyze(run_dir: str | Path, out: str | Path | None = None, batch_size: int = 256) -> dict:
    run = load_trained(run_dir)
    out = Path(out) if out is not None else run.run_dir / "analysis"
    world = run.cfg.data.world
    test, train = world_samples(world, PROBE_TEST), world_samples(world, PROBE_TRAIN)
    test_vectors = embeddings(run, test, batch_size)
    train_vectors = embeddings(run, train, batch_size)
    image_side = labels(run.model)[0].values()
    probes = {
        name: {
            attribute: probe_accuracy(
                train_vectors[name],
                train.attributes[attribute],
                test_vectors[name],
                test.attributes[attribute],
            )
            for attribute in ATTRIBUTES
        }
        for name in image_side
    }
    results = {
        "run": str(run.run_dir),
        "step": run.step,
        "mode": run.cfg.model.mode,
        "world": world.dir,
        "out": str(out),
        "samples": {"cka": len(test), "probe_train": len(train), "probe_test": len(test)},
        "attribute_samples": {
            a: [sum(x is not None for x in s.attributes[a]) for s in (train, test)]
            for a in ATTRIBUTES
        },
        "cka": cka_matrix(test_vectors),
        "probes": probes,
        "majority": {a: majority(train.attributes[a], test.attributes[a]) for a in ATTRIBUTES},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "analysis.json", json.dumps(results, indent=1))
    plot(results, out / "analysis.png")
    return results


def report(results: dict) -> str:
    """The analysis as text: the CKA matrix and the probes' accuracies."""
    names = list(results["cka"])
    width = max(len(n) for n in names) + 2
    lines = [f"{results['run']} ({results['mode']}, step {results['step']}): linear CKA"]
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for a in names:
        lines.append(
            f"{a:<{width}}" + "".join(f"{results['cka'][a][b]:>{width}.2f}" for b in names)
        )
    lines += ["", "linear probes, top-1 % (test images; majority answer last)"]
    column = max(len(a) for a in ATTRIBUTES) + 2
    lines.append(" " * width + "".join(f"{a:>{column}}" for a in ATTRIBUTES))
    rows = results["probes"] | {"majority": results["majority"]}
    for name, scores in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{scores[a]:>{column}.1f}" for a in ATTRIBUTES))
    out = Path(results["out"])
    lines += ["", f"analysis.json and analysis.png are in {out}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """CKA as a heat map beside the probes' accuracies (bars per attribute, one per image
    embedding, the majority answer marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["cka"])
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    matrix = [[results["cka"][a][b] for b in names] for a in names]
    shown = left.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    left.set_xticks(range(len(names)), names, rotation=45, ha="right")
    left.set_yticks(range(len(names)), names)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            colour = "black" if value > 0.6 else "white"
            left.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    left.set_title("linear CKA (test images, first captions)")
    fig.colorbar(shown, ax=left, fraction=0.046)
    probes = results["probes"]
    width = 0.8 / max(1, len(probes))
    for offset, (name, scores) in enumerate(probes.items()):
        xs = [i - 0.4 + (offset + 0.5) * width for i in range(len(ATTRIBUTES))]
        right.bar(xs, [scores[a] for a in ATTRIBUTES], width, label=name)
    for i, attribute in enumerate(ATTRIBUTES):
        level = results["majority"][attribute]
        right.hlines(level, i - 0.4, i + 0.4, colors="black", linestyles="dotted")
    right.set_xticks(range(len(ATTRIBUTES)), ATTRIBUTES)
    right.set_ylim(0, 100)
    right.set_ylabel("linear probe top-1 (%)")
    right.set_title(f"{results['mode']} at step {results['step']}: probes (dotted: majority)")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
