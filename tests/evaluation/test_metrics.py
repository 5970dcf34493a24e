"""Evaluation metrics against brute-force float64 loops and hand-built cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from threetowers.data.benchmarks import RetrievalSet
from threetowers.evaluation.benchmark_sets import Benchmarks
from threetowers.evaluation.chance import chance_levels, image_to_text_chance
from threetowers.evaluation.metrics import (
    alpha_sweep,
    class_embeddings,
    fit_probe,
    linear_probe,
    mix,
    retrieval,
    sample_shots,
    simplex_grid,
    zeroshot,
)


def unit(*shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def brute_retrieval(img, txt, image_of_text, ks):
    """Per-query Python loops: rank = number of candidates scoring strictly higher."""
    img, txt = img.double(), txt.double()
    owner = [int(i) for i in image_of_text]
    i2t_best = []
    for i in range(len(img)):
        scores = [float(img[i] @ txt[j]) for j in range(len(txt))]
        ranks = [sum(s > scores[j] for s in scores) for j in range(len(txt)) if owner[j] == i]
        i2t_best.append(min(ranks))
    t2i = []
    for j in range(len(txt)):
        scores = [float(txt[j] @ img[i]) for i in range(len(img))]
        t2i.append(sum(s > scores[owner[j]] for s in scores))
    out = {f"i2t_R@{k}": 100 * sum(r < k for r in i2t_best) / len(img) for k in ks}
    out.update({f"t2i_R@{k}": 100 * sum(r < k for r in t2i) / len(txt) for k in ks})
    return out


def captions_per_image(n, m, seed=0):
    """Every image gets at least one caption; the rest land on random images."""
    generator = torch.Generator().manual_seed(seed)
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=generator)])
    return owner[torch.randperm(m, generator=generator)]


def assert_metrics_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retrieval_matches_brute_force(chunk_size, dtype):
    n, m, ks = 23, 61, (1, 3, 5, 10)
    # A low dimension and correlated captions make ranks spread over many values.
    img = unit(n, 6, seed=1)
    owner = captions_per_image(n, m, seed=2)
    txt = F.normalize(img[owner] + 2.0 * unit(m, 6, seed=3), dim=-1)
    got = retrieval(img.to(dtype), txt.to(dtype), owner, ks=ks, chunk_size=chunk_size)
    want = brute_retrieval(img, txt, owner, ks)
    assert_metrics_equal(got, want)
    assert 0 < got["i2t_R@1"] < got["i2t_R@10"] < 100
    assert 0 < got["t2i_R@1"] < got["t2i_R@10"] < 100


def test_retrieval_hand_built_ranks():
    eye = torch.eye(4)
    perfect = retrieval(eye, eye, torch.arange(4), ks=(1, 5))
    assert perfect == {"i2t_R@1": 100.0, "i2t_R@5": 100.0, "t2i_R@1": 100.0, "t2i_R@5": 100.0}
    # Texts 2 and 3 are swapped: each scores 1 with the wrong image and 0 (tied with the
    # other two) with its own, so it ranks exactly 1 — ties do not push it further down.
    swapped = retrieval(eye, eye, torch.tensor([0, 1, 3, 2]), ks=(1, 2))
    assert swapped == {"i2t_R@1": 50.0, "i2t_R@2": 100.0, "t2i_R@1": 50.0, "t2i_R@2": 100.0}
    # All scores tied: every rank is 0.
    same = torch.ones(3, 2) / math.sqrt(2)
    assert retrieval(same, same, torch.arange(3), ks=(1,))["t2i_R@1"] == 100.0


def test_retrieval_image_hit_by_any_caption():
    img = torch.eye(3)
    # Image 0 owns texts 0 (= e0, rank 0) and 1 (= e2, ranked below e0): still a hit at 1.
    txt = torch.stack([img[0], img[2], img[1], img[2]])
    got = retrieval(img, txt, torch.tensor([0, 0, 1, 2]), ks=(1,))
    assert got["i2t_R@1"] == 100.0
    # Text 1 (e2) belongs to image 0 but scores higher with image 2: 3 of 4 texts hit.
    assert got["t2i_R@1"] == 75.0


def test_retrieval_rejects_bad_input():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="caption"):
        retrieval(eye, eye, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError):
        retrieval(eye, eye, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError):
        retrieval(eye, eye, torch.arange(3), ks=(0,))


def test_zeroshot_matches_brute_force():
    n, c = 200, 12
    classes = unit(c, 5, seed=4)
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(5))
    img = F.normalize(classes[labels] + 1.0 * unit(n, 5, seed=6), dim=-1)
    got = zeroshot(img.float(), classes.float(), labels, ks=(1, 3, 5), chunk_size=17)
    ranks = []
    for i in range(n):
        scores = [float(img[i] @ classes[j]) for j in range(c)]
        ranks.append(sum(s > scores[int(labels[i])] for s in scores))
    for k in (1, 3, 5):
        assert got[f"zeroshot_top{k}"] == pytest.approx(100 * sum(r < k for r in ranks) / n)
    assert 0 < got["zeroshot_top1"] <= got["zeroshot_top3"] <= got["zeroshot_top5"] < 100


def test_zeroshot_omits_topk_beyond_class_count():
    classes = torch.eye(3)
    got = zeroshot(classes, classes, torch.arange(3))
    assert got == {"zeroshot_top1": 100.0}


def test_class_embeddings_is_normalised_prompt_average():
    table = {}

    def encode(prompts):
        for p in prompts:  # a fixed random, unnormalised vector per distinct prompt
            table.setdefault(p, (1 + len(table)) * torch.randn(6, dtype=torch.float64))
        return torch.stack([table[p] for p in prompts])

    names, templates = ["cat", "dog"], ["a photo of a {}.", "a {} drawing", "{}"]
    got = class_embeddings(encode, names, templates)
    assert got.shape == (2, 6)
    for row, name in zip(got, names, strict=True):
        prompts = [t.format(name) for t in templates]
        mean = sum(table[p] / table[p].norm() for p in prompts) / len(prompts)
        torch.testing.assert_close(row, mean / mean.norm())
    assert "a photo of a dog." in table
    with pytest.raises(ValueError):
        class_embeddings(encode, names, ["no placeholder"])


def clusters(n_per_class, num_classes, dim, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return F.normalize(centres[labels] + spread * noise, dim=-1), labels


def test_linear_probe_separable_and_random():
    x, y = clusters(40, 6, 16, 0.1, seed=7)
    xt, yt = clusters(30, 6, 16, 0.1, seed=7)  # same centres, fresh noise
    xt = F.normalize(xt + 0.05 * unit(*xt.shape, seed=8), dim=-1)
    assert linear_probe(x, y, xt, yt, shots=5) == 100.0

    generator = torch.Generator().manual_seed(9)
    rx, ry = unit(400, 16, seed=10), torch.randint(0, 4, (400,), generator=generator)
    tx, ty = unit(2000, 16, seed=11), torch.randint(0, 4, (2000,), generator=generator)
    assert 19 < linear_probe(rx, ry, tx, ty, shots=10) < 31


def test_sample_shots_seeded():
    labels = torch.arange(5).repeat(20)
    a, b, c = (sample_shots(labels, 3, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.bincount(labels[a]), torch.full((5,), 3))
    assert len(set(a.tolist())) == 15
    with pytest.raises(ValueError, match="fewer"):
        sample_shots(labels, 21)


def test_linear_probe_seed_determinism():
    x, y = clusters(30, 5, 12, 1.0, seed=12)
    xt, yt = clusters(30, 5, 12, 1.0, seed=13)
    runs = [linear_probe(x, y, xt, yt, shots=4, seed=s) for s in (3, 3, 4, 5, 6)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1  # other seeds draw other shots


def ridge(x, y_onehot, penalty):
    """Direct normal equations with an explicit unpenalised bias column."""
    z = torch.cat([torch.ones(len(x), 1, dtype=x.dtype), x], dim=1)
    p = penalty * torch.eye(z.shape[1], dtype=x.dtype)
    p[0, 0] = 0
    coef = torch.linalg.solve(z.T @ z + p, z.T @ y_onehot)
    return coef[1:], coef[0]


def test_fit_probe_loo_matches_explicit_refits():
    x, y = clusters(6, 4, 10, 1.2, seed=14)
    n, grid = len(x), (1e-4, 1e-2, 1e-1, 1.0, 10.0)
    onehot = F.one_hot(y).double()
    loo = {}
    for l2 in grid:
        hits = 0
        for i in range(n):
            keep = torch.arange(n) != i
            w, b = ridge(x[keep], onehot[keep], n * l2)
            hits += int((x[i] @ w + b).argmax()) == int(y[i])
        loo[l2] = 100 * hits / n
    probe = fit_probe(x, y, grid)
    assert probe.loo_accuracy == pytest.approx(max(loo.values()))
    assert loo[probe.l2] == max(loo.values())
    w, b = ridge(x, onehot, n * probe.l2)
    torch.testing.assert_close(probe.weight, w)
    torch.testing.assert_close(probe.bias, b)
    assert len(set(loo.values())) > 1  # the grid matters here


def test_linear_probe_selects_on_training_shots_only():
    x, y = clusters(20, 5, 24, 1.5, seed=15)
    grid = tuple(10.0**e for e in range(-5, 3))
    shots, seed = 4, 2
    index = sample_shots(y, shots, seed)
    probe = fit_probe(x[index], y[index], grid)  # sees no test data at all
    for test_seed in (16, 17, 18):
        xt, yt = clusters(40, 5, 24, 1.5, seed=15)
        xt = F.normalize(xt + unit(*xt.shape, seed=test_seed), dim=-1)
        yt_scrambled = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
        for labels in (yt, yt_scrambled):
            got = linear_probe(x, y, xt, labels, shots=shots, seed=seed, l2_grid=grid)
            assert got == probe.accuracy(xt, labels)
        # The check has teeth: picking λ on this test set would have scored higher.
        per_l2 = [fit_probe(x[index], y[index], (l2,)).accuracy(xt, yt) for l2 in grid]
        assert max(per_l2) > probe.accuracy(xt, yt)


def test_mix_dot_product_formula():
    a, b, c, d, e, f = (unit(5, 4, seed=s) for s in range(20, 26))
    for alpha in (0.0, 0.3, 1.0):
        left, right = mix([a, b], [alpha, 1 - alpha]), mix([c, d], [alpha, 1 - alpha])
        torch.testing.assert_close(left @ right.T, alpha * a @ c.T + (1 - alpha) * b @ d.T)
        torch.testing.assert_close(left.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    weights = [0.5, 0.2, 0.3]  # three parts: one dot product is the three-way mixed score
    left, right = mix([a, b, e], weights), mix([c, d, f], weights)
    expected = 0.5 * a @ c.T + 0.2 * b @ d.T + 0.3 * e @ f.T
    torch.testing.assert_close(left @ right.T, expected)
    pair, own = unit(5, 8, seed=26), unit(5, 8, seed=27)  # a frozen pair's part: its own width
    left, right = mix([a, pair], [0.4, 0.6]), mix([c, own], [0.4, 0.6])
    assert left.shape == (5, 4 + 8)
    torch.testing.assert_close(left @ right.T, 0.4 * a @ c.T + 0.6 * pair @ own.T)
    torch.testing.assert_close(left.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError):
        mix([a, b], [1.5, -0.5])
    with pytest.raises(ValueError):
        mix([a, b], [1.0])


def test_simplex_grid_holds_every_mixture_in_tenths_once():
    grid = simplex_grid(3)
    assert len(grid) == len(set(grid)) == 66  # C(12, 2)
    assert all(sum(w) == pytest.approx(1.0) and min(w) >= 0 for w in grid)
    assert grid[0] == (1.0, 0.0, 0.0) and (0.3, 0.3, 0.4) in grid
    assert simplex_grid(2) == [(i / 10, (10 - i) / 10) for i in range(10, -1, -1)]


def test_alpha_sweep_retrieval_endpoints_and_scores():
    n, m = 15, 40
    owner = captions_per_image(n, m, seed=25)
    z_f, z_h = unit(n, 6, seed=26), unit(n, 8, seed=27)
    z_g = F.normalize(z_f[owner] + 1.0 * unit(m, 6, seed=28), dim=-1)
    z_gh = F.normalize(z_h[owner] + 1.0 * unit(m, 8, seed=29), dim=-1)
    seen = []

    def metric_fn(image_emb, text_emb):
        seen.append(image_emb @ text_emb.T)
        return retrieval(image_emb, text_emb, owner, ks=(1, 5))

    alphas = (0.0, 0.25, 0.5, 1.0)
    rows = alpha_sweep(z_f, z_h, z_g, z_gh, metric_fn, alphas)
    assert [r["alpha"] for r in rows] == list(alphas)
    for alpha, scores in zip(alphas, seen, strict=True):
        torch.testing.assert_close(scores, alpha * z_f @ z_g.T + (1 - alpha) * z_h @ z_gh.T)
    strip = [{k: v for k, v in r.items() if k != "alpha"} for r in rows]
    assert_metrics_equal(strip[-1], retrieval(z_f, z_g, owner, ks=(1, 5)))
    assert_metrics_equal(strip[0], retrieval(z_h, z_gh, owner, ks=(1, 5)))
    assert strip[0] != strip[-1]


def test_alpha_sweep_zeroshot_with_per_head_class_embeddings():
    names, templates = ["a", "b", "c", "d", "e", "f"], ["{}", "x {}", "{} y"]
    heads = {"g": torch.randn(6, 7, dtype=torch.float64), "gh": torch.randn(6, 9)}

    def encoder(head):
        def encode(prompts):  # a prompt's embedding: its class row plus a template offset
            rows = [
                heads[head][names.index(p.replace("x ", "").replace(" y", ""))] for p in prompts
            ]
            return torch.stack(rows).double() + 0.3 * torch.arange(len(prompts))[:, None]

        return encode

    c_g = class_embeddings(encoder("g"), names, templates)
    c_gh = class_embeddings(encoder("gh"), names, templates)
    labels = torch.arange(6).repeat(10)
    z_f = F.normalize(c_g[labels] + 1.5 * unit(60, 7, seed=30), dim=-1)
    z_h = F.normalize(c_gh[labels] + 1.5 * unit(60, 9, seed=31), dim=-1)
    rows = alpha_sweep(z_f, z_h, c_g, c_gh, lambda i, c: zeroshot(i, c, labels), (0.0, 0.5, 1.0))
    assert rows[0] == {"alpha": 0.0, **zeroshot(z_h, c_gh, labels)}
    assert rows[-1] == {"alpha": 1.0, **zeroshot(z_f, c_g, labels)}
    assert set(rows[1]) == {"alpha", "zeroshot_top1", "zeroshot_top5"}


def test_image_to_text_chance_is_what_random_embeddings_score():
    # 10 images with 5 or 6 captions each: the k*c/M estimate says 100% at k = 10
    owners = torch.tensor([i for i in range(10) for _ in range(5 + i % 2)])
    per_image = torch.bincount(owners).tolist()
    generator = torch.Generator().manual_seed(0)
    draws = [
        retrieval(
            F.normalize(torch.randn(10, 16, generator=generator, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(55, 16, generator=generator, dtype=torch.float64), dim=-1),
            owners,
        )
        for _ in range(2000)
    ]
    for k in (1, 5, 10):
        measured = sum(d[f"i2t_R@{k}"] for d in draws) / len(draws)
        exact = 100 * image_to_text_chance(per_image, k)
        # the mean of 2000 draws, each a mean of 10 hits: standard error below 0.4 points
        assert measured == pytest.approx(exact, abs=1.5), k
    for k in (1, 5, 10):  # the binomial formula, with exact integers
        direct = sum(1 - math.comb(55 - c, k) / math.comb(55, k) for c in per_image) / 10
        assert image_to_text_chance(per_image, k) == pytest.approx(direct, abs=1e-12)
    assert image_to_text_chance(per_image, 10) < 0.7  # far from the estimate's 100%
    assert image_to_text_chance([5], 10) == 1.0  # its own 5 captions are all there is
    printed = chance_levels(Benchmarks({"flickr": RetrievalSet([Path()] * 10, ["c"] * 55, owners)}))
    assert printed["i2t_R@10"] == pytest.approx(100 * image_to_text_chance(per_image, 10))
    assert printed["t2i_R@10"] == 100.0 and printed["t2i_R@1"] == pytest.approx(10.0)
