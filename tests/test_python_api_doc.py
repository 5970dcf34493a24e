"""docs/python-api.md's first example runs as written, on a batch of the tiny preset's shape."""

from __future__ import annotations

import re
from pathlib import Path

import torch

GUIDE = Path(__file__).parents[1] / "docs" / "python-api.md"


def test_the_guides_example_runs():
    example = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    generator = torch.Generator().manual_seed(0)
    namespace = {
        "images": torch.randn(4, 3, 32, 32, generator=generator),
        "tokens": torch.randint(1, 512, (4, 16), generator=generator),
    }
    exec(compile(example, str(GUIDE), "exec"), namespace)
    loss, out, model = namespace["loss"], namespace["out"], namespace["model"]
    assert torch.isfinite(loss) and {"z_f", "z_g", "z_fh", "z_gh", "z_h"} <= set(out)
    assert namespace["image_emb"].shape == (4, model.embed_dim)
    # the convex combination as one dot product: a<z_f, z_g> + (1 - a)<z_h, z_gh>, a = 0.5
    scores = namespace["mixed_img"] @ namespace["mixed_txt"].T
    direct = 0.5 * out["z_f"] @ out["z_g"].T + 0.5 * out["z_h"] @ out["z_gh"].T
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-6)
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not frozen & {id(p) for g in namespace["optimizer"].param_groups for p in g["params"]}
