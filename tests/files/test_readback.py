"""Files the tool wrote and reads back name themselves when they are damaged."""

from __future__ import annotations

import json

import pytest

from threetowers.files.readback import DamagedFileError, read_json
from threetowers.project.experiments.report import run_record


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"step": 20, "i2t_R@1": 8', "is damaged (not JSON: "),
        (b"[1, 2]", "is damaged (a JSON list, not an object)"),
        (b'{"a": "\xff"}', "is not UTF-8 text"),
    ],
    ids=["truncated", "list", "binary"],
)
def test_a_damaged_file_names_itself_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "eval.json"
    path.write_bytes(content)
    with pytest.raises(DamagedFileError) as error:
        read_json(path)
    assert str(error.value).startswith(f"{path} {problem}")
    assert str(error.value).endswith("delete it to have it written again")


def test_an_experiment_report_names_a_runs_damaged_eval_json(tmp_path):
    scores = json.dumps({"step": 20, "i2t_R@1": 80.0})
    (tmp_path / "eval.json").write_text(scores[:18])  # cut as a full disk or a copy cuts it
    with pytest.raises(DamagedFileError, match=f"^{tmp_path / 'eval.json'} is damaged"):
        run_record("matched", "3t", 0, tmp_path)
