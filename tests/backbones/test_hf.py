"""Hugging Face vision models as frozen towers: tiny random models saved to tmp_path, offline."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from tests.helpers.hf_models import (  # noqa: E402
    SIZE,
    TINY_VIT,
    _cls,
    _save_vit,
    _write_preprocessor,
    write_clip_preprocessor,
    write_siglip_preprocessor,
)
from threetowers.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from threetowers.backbones.hf import load_hf_backbone, load_preprocessing  # noqa: E402
from threetowers.cli import main  # noqa: E402
from threetowers.errors import UserError  # noqa: E402


def _images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=generator)


def _check_features(backbone, reference: torch.Tensor, images: torch.Tensor) -> None:
    features = backbone(images)
    assert features.shape == reference.shape == (images.shape[0], backbone.feature_dim)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, reference, rtol=1e-5, atol=1e-5)


def _save_resnet(directory):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    model = _cls("ResNetForImageClassification")(config)
    # Non-trivial BatchNorm statistics, so that a drift in them would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval().save_pretrained(directory)
    _write_preprocessor(
        directory,
        image_processor_type="ConvNextImageProcessor",
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_pct=0.875,
        resample=3,
        size={"shortest_edge": SIZE},
    )
    return model


def test_vit_classification_save_gives_cls_token(tmp_path):
    model = _save_vit(tmp_path)
    backbone = load_hf_backbone(tmp_path)

    assert backbone.feature_dim == 16
    assert backbone.module.pool == "cls"
    # The ViT pooler is not in a classification checkpoint: it must not be built (random).
    names = [name for name, _ in backbone.named_parameters()]
    assert not any("pooler" in name or "classifier" in name for name in names)
    images = _images()
    with torch.no_grad():
        reference = model.vit(images).last_hidden_state[:, 0]
    _check_features(backbone, reference, images)


def test_vit_forced_mean_pool(tmp_path):
    model = _save_vit(tmp_path)
    backbone = load_hf_backbone(tmp_path, pool="mean")
    images = _images()
    with torch.no_grad():
        reference = model.vit(images).last_hidden_state.mean(dim=1)
    _check_features(backbone, reference, images)


def test_resnet_classification_save_gives_flattened_pooler(tmp_path):
    model = _save_resnet(tmp_path)
    backbone = load_hf_backbone(tmp_path)

    assert backbone.feature_dim == 16 and backbone.module.pool == "pooler"
    images = _images()
    with torch.no_grad():
        reference = model.resnet(images).pooler_output.flatten(1)
    _check_features(backbone, reference, images)


def test_convnext_classification_save_gives_pooler(tmp_path):
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=4, num_labels=5
    )
    model = _cls("ConvNextForImageClassification")(config).eval()
    model.save_pretrained(tmp_path)
    _write_preprocessor(
        tmp_path,
        image_processor_type="ConvNextImageProcessor",
        crop_pct=0.875,
        resample=3,
        size={"shortest_edge": SIZE},
    )
    backbone = load_hf_backbone(tmp_path)

    assert backbone.feature_dim == 16 and backbone.module.pool == "pooler"
    images = _images()
    with torch.no_grad():
        reference = model.convnext(images).pooler_output
    _check_features(backbone, reference, images)


def test_dinov2_gives_cls_token(tmp_path):
    torch.manual_seed(0)
    vit_args = {key: value for key, value in TINY_VIT.items() if key != "intermediate_size"}
    model = _cls("Dinov2Model")(_cls("Dinov2Config")(mlp_ratio=2, **vit_args)).eval()
    model.save_pretrained(tmp_path)
    _write_preprocessor(
        tmp_path,
        image_processor_type="BitImageProcessor",
        resample=3,
        size={"shortest_edge": 36},
        do_center_crop=True,
        crop_size={"height": SIZE, "width": SIZE},
    )
    backbone = load_hf_backbone(tmp_path)

    assert backbone.feature_dim == 16 and backbone.module.pool == "cls"
    assert backbone.preprocessing.image_size == SIZE
    assert backbone.preprocessing.crop_fraction == pytest.approx(SIZE / 36)
    images = _images()
    with torch.no_grad():
        reference = model(images).last_hidden_state[:, 0]
    _check_features(backbone, reference, images)


def test_full_clip_save_gives_vision_tower_pooler(tmp_path):
    torch.manual_seed(0)
    config = _cls("CLIPConfig")(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=TINY_VIT,
        projection_dim=8,
    )
    model = _cls("CLIPModel")(config).eval()
    model.save_pretrained(tmp_path)
    write_clip_preprocessor(tmp_path)
    backbone = load_hf_backbone(tmp_path)

    assert type(backbone.module.model).__name__ == "CLIPVisionModel"
    assert not any("text" in name for name, _ in backbone.named_parameters())
    assert backbone.feature_dim == 16 and backbone.module.pool == "pooler"
    assert backbone.preprocessing.crop_fraction == 1.0
    images = _images()
    with torch.no_grad():
        reference = model.vision_model(images).pooler_output  # post-layernorm CLS
    _check_features(backbone, reference, images)


@pytest.mark.parametrize("save", ["vision", "full"])
def test_siglip_gives_map_head_pooler(tmp_path, save):
    torch.manual_seed(0)
    vision_config = _cls("SiglipVisionConfig")(**TINY_VIT)
    if save == "vision":
        model = _cls("SiglipVisionModel")(vision_config).eval()
        vision = model
    else:
        text_config = _cls("SiglipTextConfig")(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=16,
        )
        config = _cls("SiglipConfig")(
            text_config=text_config.to_dict(), vision_config=vision_config.to_dict()
        )
        model = _cls("SiglipModel")(config).eval()
        vision = model.vision_model
    model.save_pretrained(tmp_path)
    write_siglip_preprocessor(tmp_path)
    backbone = load_hf_backbone(tmp_path)

    assert type(backbone.module.model).__name__ == "SiglipVisionModel"
    assert backbone.preprocessing.resize == "bilinear"
    assert backbone.feature_dim == 16 and backbone.module.pool == "pooler"
    images = _images()
    with torch.no_grad():
        reference = vision(pixel_values=images).pooler_output
    _check_features(backbone, reference, images)


def test_frozen_eval_and_batchnorm_statistics(tmp_path):
    _save_resnet(tmp_path)
    backbone = load_hf_backbone(tmp_path)
    assert not any(param.requires_grad for param in backbone.parameters())

    before = {name: buf.clone() for name, buf in backbone.named_buffers()}
    assert any("running_mean" in name for name in before)
    backbone.train()
    assert not any(module.training for module in backbone.modules())
    for _ in range(2):
        backbone(_images(batch=4) * 3 + 1)
    for name, buf in backbone.named_buffers():
        assert torch.equal(buf, before[name]), f"{name} changed in 'train' mode"


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (  # ViT: exact square resize, no crop
            dict(
                image_mean=[0.5, 0.4, 0.3],
                image_std=[0.2, 0.25, 0.3],
                resample=2,
                size={"height": 224, "width": 224},
            ),
            dict(
                image_size=224,
                mean=(0.5, 0.4, 0.3),
                std=(0.2, 0.25, 0.3),
                resize="bilinear",
                crop_fraction=1.0,
            ),
        ),
        (  # CLIP / DINOv2: shortest edge then centre crop
            dict(
                image_mean=[0.1, 0.2, 0.3],
                image_std=[0.4, 0.5, 0.6],
                resample=3,
                size={"shortest_edge": 256},
                do_center_crop=True,
                crop_size={"height": 224, "width": 224},
            ),
            dict(
                image_size=224,
                mean=(0.1, 0.2, 0.3),
                std=(0.4, 0.5, 0.6),
                resize="bicubic",
                crop_fraction=0.875,
            ),
        ),
        (  # ConvNeXt / ResNet: crop_pct below 384px, legacy int size
            dict(
                feature_extractor_type="ConvNextFeatureExtractor",
                image_mean=[0.5, 0.5, 0.5],
                image_std=[0.5, 0.5, 0.5],
                resample=0,
                size=224,
                crop_pct=0.9,
            ),
            dict(image_size=224, resize="nearest", crop_fraction=0.9),
        ),
        (  # ConvNeXt at 384: warp, no crop
            dict(
                image_processor_type="ConvNextImageProcessor",
                size={"shortest_edge": 384},
                crop_pct=0.875,
                resample=3,
            ),
            dict(image_size=384, crop_fraction=1.0),
        ),
        (  # do_center_crop False: crop_size is ignored
            dict(
                size={"height": 64, "width": 64},
                do_center_crop=False,
                crop_size=32,
                do_normalize=False,
                resample=3,
            ),
            dict(image_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_fraction=1.0),
        ),
    ],
)
def test_preprocessor_config_parsing(tmp_path, cfg, expected):
    _write_preprocessor(tmp_path, **cfg)
    preprocessing = load_preprocessing(tmp_path).to_dict()
    for key, value in expected.items():
        assert preprocessing[key] == pytest.approx(value), key


def test_missing_preprocessor_config_warns_and_falls_back(tmp_path):
    _save_vit(tmp_path, preprocessor=False)
    with pytest.warns(UserWarning, match="preprocessor_config.json"):
        backbone = load_hf_backbone(tmp_path)
    assert backbone.preprocessing.image_size == SIZE  # from config.image_size
    assert backbone.preprocessing.mean == IMAGENET_MEAN
    assert backbone.preprocessing.std == IMAGENET_STD
    assert backbone.feature_dim == 16


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_backbone(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_backbone(tmp_path)


def test_bad_pool_value(tmp_path):
    with pytest.raises(ValueError, match="pool must be one of"):
        load_hf_backbone(tmp_path, pool="max")


def test_forced_pooler_missing_from_checkpoint_is_refused(tmp_path):
    _save_vit(tmp_path)
    with pytest.raises(ValueError, match="randomly initialised"):
        load_hf_backbone(tmp_path, pool="pooler")


def test_cls_pool_on_cnn_is_refused(tmp_path):
    _save_resnet(tmp_path)
    with pytest.raises(ValueError, match="pool='cls' needs token outputs"):
        load_hf_backbone(tmp_path, pool="cls")


def test_text_model_is_refused(tmp_path):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    _cls("BertModel")(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an image model"):
        load_hf_backbone(tmp_path)


def test_image_size_mismatch_is_explained(tmp_path):
    _save_vit(tmp_path)
    _write_preprocessor(tmp_path, size={"height": 2 * SIZE, "width": 2 * SIZE}, resample=2)
    with pytest.raises(ValueError, match="failed on a 64x64 image"):
        load_hf_backbone(tmp_path)


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"threetowers\[hf\]"):
        load_hf_backbone(tmp_path)


def test_a_folder_that_is_no_hf_model_ends_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    argv = ["summary", "tiny", "model.frozen.0.backbone=hf", f"model.frozen.0.path={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no 'model_type'; is it an HF config?" in err and "Traceback" not in err


def test_preprocessing_a_model_folder_declares_that_cannot_be_applied_is_a_user_error(tmp_path):
    _write_preprocessor(tmp_path, size=0)
    with pytest.raises(UserError, match="image_size must be positive"):
        load_preprocessing(tmp_path)
    _write_preprocessor(tmp_path, image_std=[0.5, 0, 0.5])
    with pytest.raises(UserError, match="three positive stds"):
        load_preprocessing(tmp_path)
    _write_preprocessor(tmp_path, size={"height": 32, "width": 48})
    with pytest.raises(UserError, match="only square inputs"):
        load_preprocessing(tmp_path)
