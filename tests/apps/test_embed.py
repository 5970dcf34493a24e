"""What ``threetowers embed`` is asked wrongly ends as a user error (one line, exit 2)."""

from __future__ import annotations

import pytest
import torch

from threetowers.apps.embed import caption_lines, embed, parse_alpha, save_embeddings
from threetowers.errors import UserError


def test_wrong_embed_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="give exactly one of --images DIR or --texts FILE"):
        embed(None, None)
    with pytest.raises(UserError, match="--alpha 'half': give a number in"):
        parse_alpha("half")
    with pytest.raises(ValueError, match="--alpha 'f=x'"):  # the server answers it with a 400
        parse_alpha("f=x")
    blank = tmp_path / "captions.txt"
    blank.write_text("\n  \n")
    with pytest.raises(UserError, match="holds no captions"):
        caption_lines(blank, max_bad_fraction=0.0)
    with pytest.raises(UserError, match="must end in .safetensors or .npy"):
        save_embeddings(tmp_path / "vectors.txt", torch.zeros(1, 2), ["a"])
