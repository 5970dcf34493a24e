"""ThreeTowers: frozen towers, modes, heads, precomputed features and the α combination."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import threetowers as tt
from tests.conftest import tiny_backbone, tiny_batch, tiny_config, tiny_model
from tests.helpers.reference_losses import reference_softmax


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["lit", "3t"])
def test_optimizer_step_leaves_frozen_tower_bit_identical_and_trains_its_head(mode):
    model = tiny_model(mode)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    backbone = model.frozen["h"].module
    before, head_before = snapshot(backbone), snapshot(model.heads["h"])
    assert not any(p.requires_grad for p in backbone.parameters())
    optimizer_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimizer_ids.isdisjoint({id(p) for p in backbone.parameters()})

    for step in range(2):
        images, tokens = tiny_batch(seed=step)
        loss, _ = model.loss(model(images, tokens))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert not backbone.training and not model.frozen["h"].training
    assert all(p.grad is None for p in backbone.parameters())
    after = snapshot(backbone)
    assert after.keys() == before.keys()
    for key in before:  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(head_before[k], v) for k, v in snapshot(model.heads["h"]).items())


def test_frozen_tower_runs_without_autograd_and_in_eval_mode(backbone):
    calls = []
    backbone.module.register_forward_hook(
        lambda module, inputs, output: calls.append(
            (module.training, torch.is_inference_mode_enabled())
        )
    )
    backbone.train()
    images = torch.randn(2, 3, 24, 24)
    features = backbone(images)
    assert calls == [(False, True)]
    assert not features.requires_grad and not features.is_inference()
    assert torch.equal(features, backbone(images))  # dropout (p=0.5) is inactive


def test_clip_mode_never_builds_or_runs_a_frozen_tower(monkeypatch):
    calls = []
    monkeypatch.setitem(tt.BACKBONES, "efficientnet_lite0", lambda *a: calls.append(a))
    cfg = tiny_config("clip")
    assert cfg.model.frozen  # configured, yet unused in clip mode
    model = tt.build_model(cfg)
    spy = tiny_backbone()
    spy.module.register_forward_hook(lambda *a: calls.append("forward"))
    model_with_spy = tt.build_model(cfg, frozen=spy)
    for m in (model, model_with_spy):
        assert not m.frozen and "h" not in m.heads
        images, tokens = tiny_batch()
        out = m(images, tokens)
        m.loss(out)[0].backward()
        assert set(out) == {"z_f", "z_g"}
    assert calls == []


def test_lit_mode_has_no_image_tower_and_uses_h_as_image_tower(backbone):
    model = tt.build_model(tiny_config("lit"), frozen=backbone)
    assert model.image_tower is None and set(model.heads) == {"g", "h"}
    assert model.image_preprocessing == backbone.preprocessing
    images, tokens = tiny_batch(image_size=24)
    out = model(images, tokens)
    assert set(out) == {"z_h", "z_g"}
    features = backbone(images)
    given = {"h": features}
    torch.testing.assert_close(out["z_h"], model.encode_image(None, frozen_features=given))
    torch.testing.assert_close(model(None, tokens, frozen_features=given)["z_h"], out["z_h"])
    assert model.image_key == "z_h"


def test_3t_outputs_are_normalised_and_heads_are_separate():
    model = tiny_model("3t")
    images, tokens = tiny_batch()
    out = model(images, tokens)
    assert set(out) == {"z_f", "z_g", "z_fh", "z_gh", "z_h"}
    for value in out.values():
        torch.testing.assert_close(value.norm(dim=-1), torch.ones(len(value)))
    assert set(model.heads) == {"f", "g", "fh", "gh", "h"}
    assert not torch.allclose(out["z_f"], out["z_fh"])
    shared = tiny_model("3t", "model.share_alignment_heads=true")
    assert set(shared.heads) == {"f", "g", "h"}
    out = shared(images, tokens)
    assert out["z_fh"] is out["z_f"] and out["z_gh"] is out["z_g"]


def test_precomputed_frozen_features_equal_the_live_frozen_tower():
    model = tiny_model("3t")
    images, tokens = tiny_batch()
    live = model(images, tokens)
    h = model.frozen["h"]
    features = {"h": h(model._frozen_view(h.preprocessing, images))}
    cached = model(images, tokens, frozen_features=features)
    for key in live:
        torch.testing.assert_close(live[key], cached[key])
    with pytest.raises(ValueError, match="feature cache was made with another backbone"):
        model(images, tokens, frozen_features={"h": torch.zeros(len(images), 7)})


def test_frozen_view_undoes_f_normalisation_and_applies_h_statistics():
    model = tiny_model("3t")  # f: 32 px, mean/std 0.5; h: 24 px, ImageNet statistics
    pixels = torch.rand(2, 3, 24, 24)
    h = model.frozen["h"].preprocessing
    f_images = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="nearest")
    f_images = (f_images - 0.5) / 0.5
    view = model._frozen_view(h, f_images)
    assert view.shape == (2, 3, 24, 24)
    back = view * torch.tensor(h.std).view(1, 3, 1, 1) + torch.tensor(h.mean).view(1, 3, 1, 1)
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    torch.testing.assert_close(back.mean(dim=(2, 3)), pixels.mean(dim=(2, 3)), atol=2e-2, rtol=0)


def test_encode_with_alpha_one_is_the_main_embedding():
    model = tiny_model("3t").eval()
    images, tokens = tiny_batch()
    out = model(images, tokens)
    torch.testing.assert_close(model.encode_image(images), out["z_f"])
    torch.testing.assert_close(model.encode_text(tokens), out["z_g"])


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_combined_embeddings_give_the_alpha_mixed_score(alpha):
    model = tiny_model("3t").eval()
    images, tokens = tiny_batch()
    out = model(images, tokens)
    image, text = model.encode_image(images, alpha=alpha), model.encode_text(tokens, alpha=alpha)
    assert image.shape == text.shape == (len(images), 2 * model.embed_dim)
    expected = alpha * out["z_f"].double() @ out["z_g"].double().T + (1 - alpha) * (
        out["z_h"].double() @ out["z_gh"].double().T
    )
    torch.testing.assert_close((image @ text.T).double(), expected, rtol=1e-5, atol=1e-6)


def test_alpha_errors_are_clear():
    model = tiny_model("3t")
    _, tokens = tiny_batch()
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        model.encode_text(tokens, alpha=1.5)
    clip = tiny_model("clip")
    with pytest.raises(ValueError, match="needs a 3t model"):
        clip.encode_text(tokens, alpha=0.5)


def test_frozen_backbone_requires_a_wrapper_and_measures_its_dim():
    with pytest.raises(tt.ConfigError, match="wrap your module"):
        tt.build_model(tiny_config("3t"), frozen=torch.nn.Linear(3, 3))
    assert tiny_backbone().feature_dim == 24
    with pytest.raises(ValueError, match="must return pooled"):
        tt.FrozenBackbone(torch.nn.Conv2d(3, 4, 3), tt.Preprocessing(8))


def test_convolutional_frozen_tower_runs_in_cpu_micro_batches_with_the_same_features(monkeypatch):
    # channels_last backbones run on CPU in chunks of ~CPU_CHUNK_PIXELS; the features must
    # be those of the whole batch at once, and the chunks must really be smaller.
    from tests.conftest import TinyCNN
    from threetowers.backbones import frozen

    torch.manual_seed(0)
    backbone = tt.FrozenBackbone(TinyCNN(), tt.Preprocessing(16), channels_last=True)
    images = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        whole = backbone.module(images.contiguous(memory_format=torch.channels_last))
    seen = []
    forward = backbone.module.forward
    monkeypatch.setattr(backbone.module, "forward", lambda x: seen.append(len(x)) or forward(x))
    monkeypatch.setattr(frozen, "CPU_CHUNK_PIXELS", 4 * 16 * 16)
    torch.testing.assert_close(backbone(images), whole, rtol=1e-6, atol=1e-6)
    assert seen == [4, 4, 2]


TWO = "model.frozen=[{name: a}, {name: b, f_weight: 0.5, g_weight: 0.5}]"


def two_tower_model(*overrides: str) -> tt.ThreeTowers:
    """3t with frozen towers a and b: the tiny backbone and another one with other weights."""
    torch.manual_seed(0)
    other = tiny_backbone()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(-1.5)
    return tt.build_model(
        tiny_config("3t", TWO, *overrides), frozen={"a": tiny_backbone(), "b": other}
    )


def test_each_frozen_tower_has_its_heads_terms_and_weight():
    model = two_tower_model()
    assert list(model.heads) == ["g", "f", "a", "b", "fa", "ga", "fb", "gb"]
    images, tokens = tiny_batch(image_size=32)
    out = model(images, tokens)
    assert set(out) == {"z_f", "z_g", "z_a", "z_b", "z_fa", "z_ga", "z_fb", "z_gb"}
    assert not torch.allclose(out["z_a"], out["z_b"])
    total, logs = model.loss(out)
    weights = {"f_g": 1.0, "fa_a": 1.0, "ga_a": 1.0, "fb_b": 0.5, "gb_b": 0.5}
    assert {k for k in logs if k.startswith("loss/")} == {f"loss/{t}" for t in weights}
    expected = sum(w * logs[f"loss/{t}"] for t, w in weights.items()) / sum(weights.values())
    torch.testing.assert_close(total.detach(), expected)
    for term, (image, text) in {"fb_b": ("z_fb", "z_b"), "gb_b": ("z_gb", "z_b")}.items():
        scale = logs[f"scale/{term}"].double()
        reference = reference_softmax(out[image].double(), out[text].double(), scale)
        torch.testing.assert_close(logs[f"loss/{term}"].double(), reference.detach())


def test_weights_over_f_and_both_towers_give_the_mixed_score():
    model = two_tower_model().eval()
    images, tokens = tiny_batch(image_size=32)
    out = model(images, tokens)
    weights = {"f": 0.5, "a": 0.3, "b": 0.2}
    image, text = model.encode_image(images, weights), model.encode_text(tokens, weights)
    assert image.shape == text.shape == (len(images), 3 * model.embed_dim)
    score = lambda i, t: out[i].double() @ out[t].double().T  # noqa: E731
    expected = 0.5 * score("z_f", "z_g") + 0.3 * score("z_a", "z_ga") + 0.2 * score("z_b", "z_gb")
    torch.testing.assert_close((image @ text.T).double(), expected, rtol=1e-5, atol=1e-6)
    only_b = model.encode_image(images, {"b": 1.0})  # f and a are zeros, and do not run
    torch.testing.assert_close(only_b[:, -model.embed_dim :], out["z_b"])
    assert not only_b[:, : 2 * model.embed_dim].any()
    with pytest.raises(ValueError, match="one alpha is ambiguous"):
        model.encode_text(tokens, alpha=0.5)
    with pytest.raises(ValueError, match="must sum to 1"):
        model.encode_text(tokens, {"f": 0.5, "a": 0.2})
    with pytest.raises(ValueError, match=r"name only \['f', 'a', 'b'\]"):
        model.encode_text(tokens, {"f": 0.5, "c": 0.5})


def test_the_default_tower_written_as_a_list_is_the_same_model():
    shorthand = tiny_model("3t")
    torch.manual_seed(0)
    listed = tt.build_model(tiny_config("3t", "model.frozen=[{name: h}]"), frozen=tiny_backbone())
    assert shorthand.state_dict().keys() == listed.state_dict().keys()
    for key, value in shorthand.state_dict().items():
        assert torch.equal(value, listed.state_dict()[key]), key


CAPTIONS = [f"a {c} {s}" for c, s in zip(["red", "blue"] * 4, ["ring", "star"] * 4, strict=True)]


def test_a_text_tower_reads_the_captions_and_pairs_f_with_its_own_embedding(tiny_text_encoder):
    cfg = tiny_config("3t", "model.frozen=[{name: a}, {name: t, backbone: minilm}]")
    torch.manual_seed(0)
    model = tt.build_model(cfg, frozen={"a": tiny_backbone(), "t": tiny_text_encoder}).eval()
    assert model.structure.text == ("t",) and model.structure.image_towers == ("a",)
    assert model.structure.pair("t") == ("z_ft", "z_t") and model.structure.pair("a") == (
        "z_a",
        "z_ga",
    )
    images, tokens = tiny_batch(image_size=32)
    out = model(images, tokens, captions=CAPTIONS)
    assert set(out) == {"z_f", "z_g", "z_a", "z_fa", "z_ga", "z_t", "z_ft", "z_gt"}
    expected_t = F.normalize(model.heads["t"](tiny_text_encoder(CAPTIONS)), dim=-1)
    torch.testing.assert_close(out["z_t"], expected_t)
    _, logs = model.loss(out)
    assert {"loss/ft_t", "loss/gt_t"} <= set(logs)
    weights = {"f": 0.5, "a": 0.2, "t": 0.3}
    image = model.encode_image(images, weights)
    text = model.encode_text(tokens, weights, captions=CAPTIONS)
    score = lambda i, t: out[i].double() @ out[t].double().T  # noqa: E731
    expected = 0.5 * score("z_f", "z_g") + 0.2 * score("z_a", "z_ga") + 0.3 * score("z_ft", "z_t")
    torch.testing.assert_close((image @ text.T).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass captions"):
        model(images, tokens)


def test_lit_locks_a_text_tower_in_gs_place(tiny_text_encoder):
    cfg = tiny_config("lit", "model.frozen=[{name: t, backbone: minilm}]")
    torch.manual_seed(0)
    model = tt.build_model(cfg, frozen={"t": tiny_text_encoder}).eval()
    assert model.text_tower is None and model.image_tower is not None
    assert list(model.heads) == ["f", "t"] and model.structure.text_key == "z_t"
    images, tokens = tiny_batch(image_size=32)
    out = model(images, tokens, captions=CAPTIONS)
    assert set(out) == {"z_f", "z_t"}
    total, logs = model.loss(out)
    assert set(k for k in logs if k.startswith("loss/")) == {"loss/f_t"}
    scale = logs["scale/f_t"].double()
    reference = reference_softmax(out["z_f"].double(), out["z_t"].double(), scale)
    torch.testing.assert_close(total.double(), reference.detach())
    text = model.encode_text(tokens, captions=CAPTIONS)
    torch.testing.assert_close(text, out["z_t"])
    total.backward()  # f, the heads and the scale learn; the locked tower does not
    assert model.image_tower.patch_embed.weight.grad is not None
    assert model.heads["t"].weight.grad is not None
    assert all(p.grad is None for p in tiny_text_encoder.parameters())
