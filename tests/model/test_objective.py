"""model/objective.py: which towers, heads and terms each mode has, and the one check of a
mode's frozen towers."""

from __future__ import annotations

import pytest

from threetowers.model.objective import (
    MODES,
    alignment_terms,
    check_frozen_towers,
    pair_sides,
    structure,
    term_weights,
)


def names(s) -> list[tuple[str, str, str, bool]]:
    return [(t.name, t.image_key, t.text_key, t.alignment) for t in s.terms]


def test_clip_trains_f_and_g_and_runs_no_frozen_tower():
    s = structure("clip", ["h"])  # configured, never built
    assert (s.trains_image_tower, s.trains_text_tower, s.frozen, s.aligned) == (True, True, (), ())
    assert names(s) == [("f_g", "z_f", "z_g", False)]
    assert (s.image_key, s.text_key) == ("z_f", "z_g")


def test_lit_locks_its_tower_in_f_or_in_g_for_a_text_tower():
    image = structure("lit", ["h"])
    assert not image.trains_image_tower and image.trains_text_tower
    assert names(image) == [("h_g", "z_h", "z_g", False)] and image.image_key == "z_h"
    text = structure("lit", ["t"], text=["t"])
    assert text.trains_image_tower and not text.trains_text_tower
    assert names(text) == [("f_t", "z_f", "z_t", False)] and text.text_key == "z_t"


def test_3t_aligns_f_and_g_with_every_tower_through_its_own_heads():
    s = structure("3t", ["h", "t"], text=["t"])
    assert s.aligned == ("h", "t") and s.image_towers == ("h",)
    assert names(s) == [
        ("f_g", "z_f", "z_g", False),
        ("fh_h", "z_fh", "z_h", True),
        ("gh_h", "z_gh", "z_h", True),
        ("ft_t", "z_ft", "z_t", True),
        ("gt_t", "z_gt", "z_t", True),
    ]
    assert s.pair("h") == ("z_h", "z_gh") and s.pair("t") == ("z_ft", "z_t")
    assert alignment_terms("h") == ("fh_h", "gh_h")  # a tower named h keeps its old names


def test_term_weights_by_side():
    s = structure("3t", ["a", "b"])
    weights = term_weights(s, 2.0, {"a": (1.0, 0.5), "b": (0.0, 3.0)})
    assert weights == {"f_g": 2.0, "fa_a": 1.0, "ga_a": 0.5, "fb_b": 0.0, "gb_b": 3.0}
    assert term_weights(structure("lit", ["a"]), 2.0, {"a": (1.0, 1.0)}) == {}


def test_a_pair_is_two_aligned_towers_in_its_place_and_a_distillation_term():
    s = structure("3t", ["h", "p", "t"], text=["t"], pairs=["p"])
    assert pair_sides("p") == ("pimg", "ptxt")
    assert s.frozen == s.aligned == ("h", "pimg", "ptxt", "t")
    assert s.text == ("ptxt", "t") and s.image_towers == ("h", "pimg")
    assert s.pairs == ("p",) and s.parts == ("h", "pimg", "ptxt", "t", "p")
    assert names(s)[3:7] == [
        ("fpimg_pimg", "z_fpimg", "z_pimg", True),
        ("gpimg_pimg", "z_gpimg", "z_pimg", True),
        ("fptxt_ptxt", "z_fptxt", "z_ptxt", True),
        ("gptxt_ptxt", "z_gptxt", "z_ptxt", True),
    ]
    (distill,) = [t for t in s.terms if t.teacher]
    assert (distill.name, distill.image_key, distill.text_key) == ("fg_p", "z_f", "z_g")
    assert distill.teacher == ("u_pimg", "u_ptxt") == s.pair("p")
    assert s.pair("pimg") == ("z_pimg", "z_gpimg") and s.pair("ptxt") == ("z_fptxt", "z_ptxt")
    assert [s.is_side(n) for n in s.frozen] == [False, True, True, False]
    assert structure("clip", ["p"], pairs=["p"]).frozen == ()  # clip builds no pair either


def test_a_pairs_sides_share_its_weights_and_its_term_has_its_own():
    s = structure("3t", ["h", "p"], pairs=["p"])
    weights = term_weights(s, 2.0, {"h": (1.0, 0.5), "p": (0.0, 3.0)}, {"p": 0.25})
    assert weights == {
        "f_g": 2.0,
        "fh_h": 1.0,
        "gh_h": 0.5,
        "fpimg_pimg": 0.0,
        "gpimg_pimg": 3.0,
        "fptxt_ptxt": 0.0,
        "gptxt_ptxt": 3.0,
        "fg_p": 0.25,
    }


@pytest.mark.parametrize(
    ("towers", "pairs", "message"),
    [
        (["p", "pimg"], ["p"], r"clash: \['fpimg', 'gpimg', 'pimg'\]"),
        (["p", "fpimg"], ["p"], r"clash: \['fpimg'\]"),
        (["h", "h"], ["h"], r"clash: \['fhimg', 'fhtxt', 'ghimg'"),
    ],
)
def test_a_pairs_names_may_not_clash(towers, pairs, message):
    with pytest.raises(ValueError, match=message):
        structure("3t", towers, pairs=pairs)


def test_lit_cannot_lock_a_pair():
    with pytest.raises(ValueError, match=r"'lit' locks one frozen tower .* \['p'\] is a frozen"):
        structure("lit", ["p"], pairs=["p"])


@pytest.mark.parametrize(
    ("mode", "towers", "message"),
    [
        ("3t", [], r"mode '3t' needs a frozen tower; list one under model.frozen"),
        ("lit", [], r"mode 'lit' needs a frozen tower"),
        ("lit", ["a", "b"], r"mode 'lit' locks one frozen tower .*\['a', 'b'\]"),
        ("3t", ["h", "fh"], r"clash: \['fh'\]"),
        ("clip", ["g"], r"clash: \['g'\]"),
        ("siglip", ["h"], r"unknown mode 'siglip'; choose one of \('clip', 'lit', '3t'\)"),
    ],
)
def test_one_check_of_the_towers_for_python_and_configs(mode, towers, message):
    with pytest.raises(ValueError, match=message):
        check_frozen_towers(mode, towers)
    with pytest.raises(ValueError, match=message):
        structure(mode, towers)


def test_text_towers_are_frozen_towers():
    assert MODES == ("clip", "lit", "3t")
    with pytest.raises(ValueError, match=r"text towers \['t'\] must be among"):
        structure("3t", ["h"], text=["t"])
