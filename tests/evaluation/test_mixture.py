"""evaluation/mixture.py with a frozen pair: its own score (u_timg, u_ttxt, 8 wide beside
16-wide parts) is a part of eval's grid, each row's mixed score is Σ_p a_p⟨x_p, y_p⟩ and the
row with all weight on the pair is transformers' own retrieval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.pair_parts import own_embeddings, pair_model, square_images
from threetowers.config import EvalConfig
from threetowers.evaluation import metrics
from threetowers.evaluation.benchmark_sets import resolve_benchmarks
from threetowers.evaluation.embedding import embed_images, embed_texts
from threetowers.evaluation.mixture import Mixture
from threetowers.evaluation.suite import evaluate_model

COLOURS, THINGS = ("red", "green", "blue", "big"), ("cat", "dog", "bird", "car", "house")
IMAGES = 8


def caption(number: int, which: int) -> str:
    """Two captions per image, of the pair's words."""
    return f"a {COLOURS[(number + which) % 4]} {THINGS[number % 5]} on the {THINGS[which]}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    built = pair_model(root / "clip")
    paths = square_images(root / "retrieval", IMAGES)
    entries = [
        {
            "filename": path.name,
            "split": "test",
            "sentences": [{"raw": caption(number, which)} for which in range(2)],
        }
        for number, path in enumerate(paths)
    ]
    (root / "retrieval" / "dataset.json").write_text(json.dumps({"images": entries}))
    captions = [caption(number, which) for number in range(IMAGES) for which in range(2)]
    owners = torch.arange(IMAGES).repeat_interleave(2)
    return built, paths, captions, owners, root / "retrieval" / "dataset.json"


def test_a_pairs_own_score_is_a_part_of_the_grid(pair):
    built, *_ = pair
    mixture = Mixture.of(built.model)
    assert mixture.parts == ("h", "timg", "ttxt", "t")
    assert mixture.image_parts == ("z_f", "z_h", "z_timg", "z_fttxt", "u_timg")
    assert mixture.text_parts == ("z_g", "z_gh", "z_gtimg", "z_ttxt", "u_ttxt")
    assert mixture.key == "alpha_grid" and len(mixture.grid()) == math.comb(10 + 4, 4)


def test_every_rows_score_is_the_convex_combination_over_parts_of_two_widths(pair):
    built, paths, captions, _, _ = pair
    images = embed_images(built.model, paths, batch_size=4)
    texts = embed_texts(built.model, built.tokenizer, captions)
    own_images, own_texts = own_embeddings(built, paths, captions)
    mixture = Mixture.of(built.model)
    rows = mixture.sweep(images, texts, lambda i, t: {"scores": i.double() @ t.double().T})
    pieces = [
        images[i].double() @ texts[t].double().T
        for i, t in zip(mixture.image_parts[:-1], mixture.text_parts[:-1], strict=True)
    ]
    pieces.append(own_images.double() @ own_texts.double().T)  # transformers' own score
    for row in rows:
        expected = sum(w * piece for w, piece in zip(row["weights"], pieces, strict=True))
        torch.testing.assert_close(row["scores"], expected, atol=1e-5, rtol=0)


def test_evals_row_with_all_weight_on_the_pair_is_its_own_retrieval(pair):
    built, paths, captions, owners, dataset = pair
    cfg = EvalConfig(batch_size=4, fewshot_shots=0, retrieval=str(dataset))
    results = evaluate_model(built.model, built.tokenizer, resolve_benchmarks(cfg, None), cfg)
    rows = {tuple(row["weights"].items()): row for row in results["alpha_grid"]}
    assert len(rows) == math.comb(14, 4)
    own = rows[(("f", 0.0), ("h", 0.0), ("timg", 0.0), ("ttxt", 0.0), ("t", 1.0))]
    reference = metrics.retrieval(*own_embeddings(built, paths, captions), owners)
    assert {key: own[key] for key in reference} == reference
    main = rows[(("f", 1.0), ("h", 0.0), ("timg", 0.0), ("ttxt", 0.0), ("t", 0.0))]
    assert {key: main[key] for key in reference} == {key: results[key] for key in reference}
