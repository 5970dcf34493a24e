"""What a mode means: which towers run, which heads exist and which terms the loss has.

This is the one place that reads a mode string. clip trains f and g and aligns no frozen
tower; lit locks one frozen tower in f's place (an image tower) or in g's (a text tower);
3t trains f and g and aligns both with every frozen tower k through their own heads W_f->k
and W_g->k (METHOD.md). Everything else asks the :class:`Structure` instead of comparing
modes. (The module keeps its name: it holds the objective's terms and their weights.)

Names: a frozen tower k has the embedding ``z_k`` (head ``k``); f's and g's heads towards it
are ``fk`` and ``gk`` (embeddings ``z_fk``, ``z_gk``), its terms ``fk_k`` and ``gk_k``. A
single tower named ``h`` (the default ``model.frozen``) thus keeps every name it had when
there was one third tower: z_h, z_fh, z_gh, fh_h, gh_h, h_g.

A frozen pair p (an image-text model whose sides share a space, a CLIP teacher) is two
frozen towers, its image side ``pimg`` and its text side ``ptxt``, each with the heads and
terms of any frozen tower, plus the distillation term ``fg_p`` that teaches (z_f, z_g) the
pair's own in-batch similarities of ``u_pimg`` and ``u_ptxt`` (each side's features,
normalised). In the convex combination the pair's own score ⟨u_pimg, u_ptxt⟩ is part ``p``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["clip", "lit", "3t"]
MODES: tuple[str, ...] = get_args(Mode)
MAIN_TERM = "f_g"
TRAINED_TOWERS = ("f", "g")


def embedding(head: str) -> str:
    """The key of the embedding that head ``head`` makes: ``z_`` and its name."""
    return f"z_{head}"


Z_F, Z_G = embedding("f"), embedding("g")  # the trained towers' embeddings


def pair_sides(pair: str) -> tuple[str, str]:
    """The frozen towers that are pair ``pair``'s image side and text side."""
    return f"{pair}img", f"{pair}txt"


def own_embedding(side: str) -> str:
    """The key of a pair side's own embedding: its features, normalised, in the pair's
    shared space (``u_`` and the side's name)."""
    return f"u_{side}"


def distillation_term(pair: str) -> str:
    """The name of the term that teaches (z_f, z_g) pair ``pair``'s similarities."""
    return f"fg_{pair}"


@dataclass(frozen=True)
class Term:
    name: str
    image_key: str
    text_key: str
    alignment: bool  # an alignment with a frozen tower (may be L2), not the main image-text term
    # a distillation term: the teacher pair's image and text embedding keys, whose in-batch
    # distributions image_key's and text_key's are taught (``losses.distillation_term``)
    teacher: tuple[str, str] | None = None


@dataclass(frozen=True)
class Structure:
    """The structure of a model: its towers, heads and loss terms."""

    mode: str
    trains_image_tower: bool  # f is trained (clip, 3t); else a frozen tower is locked in
    frozen: tuple[str, ...]  # the frozen towers the model runs, in config order
    aligned: tuple[str, ...]  # those that f and g are aligned with (own heads, own terms)
    terms: tuple[Term, ...]
    text: tuple[str, ...] = ()  # the frozen towers that read captions (the rest read images)
    trains_text_tower: bool = True  # g is trained; else a frozen text tower is locked in
    pairs: tuple[str, ...] = ()  # the frozen pairs, each two of ``frozen`` (pair_sides)

    @property
    def parts(self) -> tuple[str, ...]:
        """The convex combination's parts besides the main pair (``f``): each aligned
        tower's pair, then each frozen pair's own score."""
        return (*self.aligned, *self.pairs)

    def is_side(self, name: str) -> bool:
        """Whether frozen tower ``name`` is a side of a frozen pair (and so gives ``u_``)."""
        return any(name in pair_sides(pair) for pair in self.pairs)

    @property
    def image_key(self) -> str:
        """The embedding that stands for an image at deployment: z_f, or the locked tower's."""
        return Z_F if self.trains_image_tower else embedding(self.frozen[0])

    @property
    def text_key(self) -> str:
        """The embedding that stands for a text at deployment: z_g, or the locked tower's."""
        return Z_G if self.trains_text_tower else embedding(self.frozen[0])

    @property
    def image_towers(self) -> tuple[str, ...]:
        """The frozen towers that read images."""
        return tuple(name for name in self.frozen if name not in self.text)

    def pair(self, name: str) -> tuple[str, str]:
        """(image side, text side) of part ``name`` in the convex combination: an image
        tower k scores ⟨z_k, z_gk⟩, a text tower t ⟨z_ft, z_t⟩ (its own embedding of the
        query, so any words reach it), a frozen pair p ⟨u_pimg, u_ptxt⟩."""
        if name in self.pairs:
            return tuple(own_embedding(side) for side in pair_sides(name))
        on_f, on_g = alignment_names(name)
        if name in self.text:
            return embedding(on_f), embedding(name)
        return embedding(name), embedding(on_g)


def alignment_names(name: str) -> tuple[str, str]:
    """f's and g's heads (and embeddings ``z_...``) towards frozen tower ``name``."""
    return f"f{name}", f"g{name}"


def alignment_terms(name: str) -> tuple[str, str]:
    """The names of the terms aligning f and g with frozen tower ``name`` (3t): ``fk_k``,
    ``gk_k``; a tower's ``f_weight`` and ``g_weight`` weigh them."""
    on_f, on_g = alignment_names(name)
    return f"{on_f}_{name}", f"{on_g}_{name}"


def term_weights(
    structure: Structure,
    main: float,
    sides: Mapping[str, tuple[float, float]],
    distill: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Each term's weight: ``main`` for f_g, ``sides[k]`` (f's, g's) for aligned tower k's two
    terms (a pair's for each of its sides), ``distill[p]`` for pair p's distillation term;
    none without aligned towers (clip, lit: one term, of weight 1)."""
    if not structure.aligned:
        return {}
    owner = {side: pair for pair in structure.pairs for side in pair_sides(pair)}
    weights = {MAIN_TERM: main}
    for name in structure.aligned:
        weights |= dict(zip(alignment_terms(name), sides[owner.get(name, name)], strict=True))
    for pair in structure.pairs:
        weights[distillation_term(pair)] = (distill or {}).get(pair, 1.0)
    return weights


def check_frozen_towers(mode: str, names: Sequence[str], pairs: Sequence[str] = ()) -> None:
    """The one check of a mode's frozen towers, shared by :func:`structure` and the config (so
    a Python user and a config user read the same message): names that would name two heads,
    and the number of towers each mode takes (clip ignores any that are configured).
    ``pairs``: those of ``names`` that are frozen pairs (two towers each, ``pair_sides``)."""
    names = list(names)
    towers = [side for name in names for side in (pair_sides(name) if name in pairs else [name])]
    derived = [*pairs, *(n for name in towers for n in (name, *alignment_names(name)))]
    clashes = {n for n in derived if derived.count(n) > 1} | (set(TRAINED_TOWERS) & set(names))
    if clashes:
        raise ValueError(
            f"frozen tower names {names} clash: {sorted(clashes)} would name two things (tower "
            "k's heads are k, fk and gk, a pair p's sides are pimg and ptxt, and f, g are the "
            "trained towers); rename them"
        )
    if mode == "lit" and pairs:
        raise ValueError(
            f"mode 'lit' locks one frozen tower in a trained tower's place, and {list(pairs)} "
            "is a frozen pair (two towers); use mode '3t' to align with it and distil it"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode in ("lit", "3t") and not names:
        raise ValueError(
            f"mode {mode!r} needs a frozen tower; list one under model.frozen (e.g. backbone "
            "efficientnet_lite0), or use mode 'clip'"
        )
    if mode == "lit" and len(names) > 1:
        raise ValueError(
            f"mode 'lit' locks one frozen tower as the image tower; model.frozen lists "
            f"{len(names)} ({names}): keep one, or use mode '3t'"
        )


def structure(
    mode: str, frozen: Sequence[str], text: Sequence[str] = (), pairs: Sequence[str] = ()
) -> Structure:
    """The structure of ``mode`` with the frozen towers named ``frozen`` (config order), of
    which ``text`` read captions and ``pairs`` are frozen pairs. A text tower t has the same
    heads and terms as an image tower (z_t from the caption, W_f->t and W_g->t aligned with
    it); a pair p is its two sides (``pair_sides``) in its place, and a distillation term."""
    frozen, text, pairs = tuple(frozen), tuple(text), tuple(pairs)
    check_frozen_towers(mode, frozen, pairs)
    if not set(text) <= set(frozen):
        raise ValueError(f"text towers {list(text)} must be among the frozen towers {list(frozen)}")
    if not set(pairs) <= set(frozen) - set(text):
        raise ValueError(
            f"frozen pairs {list(pairs)} must be among the frozen towers {list(frozen)}, and "
            f"not text towers {list(text)}"
        )
    if mode != "clip" and pairs:  # each pair becomes its two sides, in its place
        frozen = tuple(t for n in frozen for t in (pair_sides(n) if n in pairs else (n,)))
        reads_captions = set(text) | {pair_sides(pair)[1] for pair in pairs}
        text = tuple(name for name in frozen if name in reads_captions)
    if mode == "clip":  # a clip model never builds, loads or runs a frozen tower
        return Structure(mode, True, (), (), (Term(MAIN_TERM, Z_F, Z_G, False),))
    if mode == "lit":
        (locked,) = frozen
        if text:  # a locked text tower takes g's place (OpenCLIP's --lock-text)
            term = Term(f"f_{locked}", Z_F, embedding(locked), False)
            return Structure(mode, True, frozen, (), (term,), text, trains_text_tower=False)
        return Structure(
            mode, False, frozen, (), (Term(f"{locked}_g", embedding(locked), Z_G, False),)
        )
    terms = [Term(MAIN_TERM, Z_F, Z_G, False)]
    for name in frozen:
        on_f, on_g = alignment_names(name)
        f_side, g_side = alignment_terms(name)
        terms += [
            Term(f_side, embedding(on_f), embedding(name), True),
            Term(g_side, embedding(on_g), embedding(name), True),
        ]
    for pair in pairs:
        teacher = tuple(own_embedding(side) for side in pair_sides(pair))
        terms.append(Term(distillation_term(pair), Z_F, Z_G, False, teacher))
    return Structure(mode, True, frozen, frozen, tuple(terms), text, pairs=pairs)
