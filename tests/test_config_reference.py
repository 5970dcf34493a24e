"""docs/config-reference.md is generated from the config's fields, never written by hand."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from threetowers.config import ExperimentConfig
from threetowers.config.reference import COMMAND, _sections, reference_page

PAGE = Path(__file__).parents[1] / "docs" / "config-reference.md"


def test_the_committed_page_is_the_generated_one():
    assert PAGE.read_text() == reference_page(), f"the config changed: run `{COMMAND}`"


def test_every_key_is_described():
    sections: list[tuple[str, type[BaseModel]]] = _sections(ExperimentConfig, "")
    undescribed = [
        f"{key}.{name}".lstrip(".")
        for key, section in sections
        for name, field in section.model_fields.items()
        if not field.description
    ]
    assert not undescribed, f"give these a Field(description=...): {undescribed}"
    assert {key for key, _ in sections} >= {"model.frozen.N", "data.train.N", "pretrain.vit"}
