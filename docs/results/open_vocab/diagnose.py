"""Where the held-out zero-shot is lost: synonyms or sentence frames, and in MiniLM or f.

For 3T runs with MiniLM (``OUT/runs/minilm-3t-seed*``), on the world's object test images:
zero-shot top-1 of the text pair (z_f->t against MiniLM's prompts) and of the main pair
(z_f against g's prompts) with the class names and the templates each ordinary or held out;
text to text, in MiniLM's own space and in the text pair's: is each held-out prompt ensemble
nearest its own class's ordinary one?; and per class, the held-out zero-shot of both pairs.

    python docs/results/open_vocab/diagnose.py OUT > diagnosis.json
"""

import json
import sys
from pathlib import Path

from threetowers.data.benchmarks import load_class_folder
from threetowers.evaluation import metrics
from threetowers.evaluation.suite import embed_images, embed_texts
from threetowers.model.objective import Z_F, Z_G
from threetowers.model.trained import TrainedRun, load_trained


def classes(run: TrainedRun, key: str, names: list[str], templates: list[str]):
    def encode(prompts):
        return embed_texts(run.model, run.tokenizer, prompts)[key]

    return metrics.class_embeddings(encode, names, templates)


def _prompts(dataset) -> tuple[list[str], list[str]]:
    return dataset.class_names, dataset.templates


def diagnose(run_dir: Path) -> dict:
    run = load_trained(run_dir)
    world = Path(run.cfg.data.world.dir)
    sets = {
        "ordinary": load_class_folder(world / "zeroshot_objects", "test"),
        "heldout": load_class_folder(world / "zeroshot_objects_heldout", "test"),
    }
    images = embed_images(run.model, sets["ordinary"].image_paths, 256)
    labels = sets["ordinary"].labels[images["index"]]
    pairs = {"text": run.model.structure.pair("minilm"), "main": (Z_F, Z_G)}
    scores = {}
    for names in sets:
        for frames in sets:
            for pair, (image_key, text_key) in pairs.items():
                prompts = classes(run, text_key, sets[names].class_names, sets[frames].templates)
                top1 = metrics.zeroshot(images[image_key], prompts, labels)["zeroshot_top1"]
                scores[f"{pair} pair, {names} names, {frames} templates"] = top1
    # Text to text: is each held-out prompt ensemble nearest its own class's ordinary one, in
    # MiniLM's own space and in the text pair's (MiniLM, then its trained head W_t)?
    spaces = {
        "MiniLM": lambda prompts: run.model.frozen["minilm"](prompts),
        "text pair": lambda prompts: embed_texts(run.model, run.tokenizer, prompts)[
            pairs["text"][1]
        ],
    }
    for space, encode in spaces.items():
        ordinary = metrics.class_embeddings(encode, *_prompts(sets["ordinary"]))
        heldout = metrics.class_embeddings(encode, *_prompts(sets["heldout"]))
        nearest = (heldout @ ordinary.T).argmax(1).tolist()
        scores[f"{space}, text to text: each held-out name's nearest class"] = {
            held: sets["ordinary"].class_names[i]
            for held, i in zip(sets["heldout"].class_names, nearest, strict=True)
        }
        correct = sum(i == c for c, i in enumerate(nearest))
        scores[f"{space}, text to text: held-out names nearest their own class (of 12)"] = correct
    for pair, (image_key, text_key) in pairs.items():
        prompts = classes(run, text_key, sets["heldout"].class_names, sets["heldout"].templates)
        predicted = (images[image_key] @ prompts.T).argmax(1)
        scores[f"{pair} pair, held-out prompts, top-1 per class"] = {
            name: 100 * float((predicted[labels == c] == c).float().mean())
            for c, name in enumerate(sets["heldout"].class_names)
        }
    return scores


if __name__ == "__main__":
    runs = sorted((Path(sys.argv[1]) / "runs").glob("minilm-3t-seed*"))
    print(json.dumps({run_dir.name: diagnose(run_dir) for run_dir in runs}, indent=1))
