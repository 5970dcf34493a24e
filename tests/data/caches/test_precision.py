"""data.cache_precision: fp32 caches keep their names, a bf16-built cache has its own folder
and its towers ran under bf16 autocast (on the CPU with a warning)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

import threetowers as tt
from tests.conftest import tiny_backbone
from tests.helpers.feature_caches import live
from tests.helpers.shards import SHARD_SIZES, write_shards
from threetowers.config import ConfigError
from threetowers.data.caches.captions import build_caption_caches
from threetowers.data.caches.features import build_caches
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.units import dataset_units
from threetowers.data.sources.pairs import iter_pairs

WARNING = (
    "data.cache_precision=bf16 on the cpu: bf16 autocast is fast only on CPUs with bf16 "
    "instructions (AVX512-BF16, AMX), emulated and slower than fp32 on others; set "
    "data.cache_precision=fp32 if this build crawls"
)


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_shards(tmp_path / "data", SHARD_SIZES[:2])


def test_an_fp32_cache_keeps_the_name_it_had_before_precision_was_a_key(tmp_path):
    tower = tiny_backbone()
    spec = {"dtype": "float16", "tower": tower.digest()}  # what named a cache until now
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    folder, named = CacheSpec(tmp_path).folder(tower)
    assert (folder, named) == (tmp_path / f"tiny_cnn-{digest[:16]}", digest)
    bf16, _ = CacheSpec(tmp_path, precision="bf16").folder(tower)
    assert bf16 != folder and bf16.name.startswith("tiny_cnn-")


def rows(cache, source) -> torch.Tensor:
    return torch.stack([cache.features(pair.row, pair.key) for pair in iter_pairs(source)])


def test_bf16_on_the_cpu_is_autocast_with_a_warning_into_a_cache_of_its_own(
    shards, tmp_path, caplog
):
    tower, units = tiny_backbone(), dataset_units(shards)
    exact = build_caches({"h": tower}, units, CacheSpec(tmp_path, "float32"), progress=False)
    spec = CacheSpec(tmp_path, "float32", precision="bf16")
    with caplog.at_level(logging.WARNING, logger="threetowers"):
        half = build_caches({"h": tower}, units, spec, progress=False)
    assert caplog.messages == [WARNING]
    assert Path(half["h"].units[0].npy).parent != Path(exact["h"].units[0].npy).parent
    fp32, autocast = rows(exact["h"], shards), rows(half["h"], shards)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # the reference: h in bf16
        first = live(tower, next(iter_pairs(shards)).image).float()
    assert not torch.equal(autocast, fp32)
    # h in bf16: nearer its bf16 features than the fp32 rows are
    assert (autocast[0] - first).abs().max() < (fp32[0] - first).abs().max() / 2
    torch.testing.assert_close(autocast, fp32, rtol=3e-2, atol=3e-2)
    caplog.clear()
    build_caches({"h": tower}, units, spec, progress=False)  # complete: nothing computed
    assert not caplog.messages


def test_a_text_towers_bf16_cache_is_its_own(shards, tmp_path, tiny_text_encoder, caplog):
    units, tower = dataset_units(shards), {"t": tiny_text_encoder}
    exact = build_caption_caches(tower, units, CacheSpec(tmp_path, "float32"), 4, False)["t"]
    spec = CacheSpec(tmp_path, "float32", precision="bf16")
    with caplog.at_level(logging.WARNING, logger="threetowers"):
        half = build_caption_caches(tower, units, spec, 4, False)["t"]
    assert caplog.messages == [WARNING]
    pair = next(iter_pairs(shards))
    fp32 = exact.caption_features(pair.row, pair.caption)
    autocast = half.caption_features(pair.row, pair.caption)
    assert not torch.equal(autocast, fp32)
    torch.testing.assert_close(autocast, fp32, rtol=5e-2, atol=5e-2)


def test_cache_precision_takes_fp32_or_bf16():
    assert tt.load_config("tiny").data.cache_precision == "fp32"
    assert tt.load_config("tiny", ["data.cache_precision=bf16"]).data.cache_precision == "bf16"
    with pytest.raises(ConfigError, match="data.cache_precision: Input should be 'fp32' or 'bf16'"):
        tt.load_config("tiny", ["data.cache_precision=fp16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bf16_cache_on_cuda_is_the_fp32_one_within_bf16s_precision(shards, tmp_path):
    tower = tiny_backbone().cuda()
    units = dataset_units(shards)
    exact = build_caches(
        {"h": tower}, units, CacheSpec(tmp_path / "cache", "float32"), progress=False
    )["h"]
    half = CacheSpec(tmp_path / "cache", "float32", precision="bf16")
    bf16 = build_caches({"h": tower}, units, half, progress=False)["h"]
    assert Path(bf16.units[0].npy).parent != Path(exact.units[0].npy).parent
    rows = [(exact.features(p.row, p.key), bf16.features(p.row, p.key)) for p in iter_pairs(shards)]
    fp32, autocast = torch.stack([a for a, _ in rows]), torch.stack([b for _, b in rows])
    assert not torch.equal(fp32, autocast)  # the towers ran in bf16
    torch.testing.assert_close(autocast, fp32, rtol=2e-2, atol=2e-2)
