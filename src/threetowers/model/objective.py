"""What a mode means: which towers run, which heads exist and which terms the loss has.

This is the one place that reads a mode string. clip trains f and g and aligns no frozen
tower; lit locks one frozen tower in f's place (an image tower) or in g's (a text tower);
3t trains f and g and aligns both with every frozen tower k through their own heads W_f->k
and W_g->k (METHOD.md). Everything else asks the :class:`Objective` instead of comparing
modes.

Names: a frozen tower k has the embedding ``z_k`` (head ``k``); f's and g's heads towards it
are ``fk`` and ``gk`` (embeddings ``z_fk``, ``z_gk``), its terms ``fk_k`` and ``gk_k``. A
single tower named ``h`` (``model.third``) thus keeps every name it had when there was one
third tower: z_h, z_fh, z_gh, fh_h, gh_h, h_g.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("clip", "lit", "3t")
MAIN_TERM = "f_g"


def embedding(head: str) -> str:
    """The key of the embedding that head ``head`` makes: ``z_`` and its name."""
    return f"z_{head}"


Z_F, Z_G = embedding("f"), embedding("g")  # the trained towers' embeddings


@dataclass(frozen=True)
class Term:
    name: str
    image_key: str
    text_key: str
    alignment: bool  # an alignment with a frozen tower (may be L2), not the main image-text term


@dataclass(frozen=True)
class Objective:
    """The structure of a model: its towers, heads and loss terms."""

    mode: str
    trains_image_tower: bool  # f is trained (clip, 3t); else a frozen tower is locked in
    frozen: tuple[str, ...]  # the frozen towers the model runs, in config order
    aligned: tuple[str, ...]  # those that f and g are aligned with (own heads, own terms)
    terms: tuple[Term, ...]
    text: tuple[str, ...] = ()  # the frozen towers that read captions (the rest read images)
    trains_text_tower: bool = True  # g is trained; else a frozen text tower is locked in

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
        """(image side, text side) of aligned tower ``name``'s pair in the convex combination:
        an image tower k scores ⟨z_k, z_gk⟩, a text tower t ⟨z_ft, z_t⟩ (its own embedding
        of the query, so any words reach it)."""
        on_f, on_g = alignment_names(name)
        if name in self.text:
            return embedding(on_f), embedding(name)
        return embedding(name), embedding(on_g)


def alignment_names(name: str) -> tuple[str, str]:
    """f's and g's heads (and embeddings ``z_...``) towards frozen tower ``name``."""
    return f"f{name}", f"g{name}"


def objective(mode: str, frozen: Sequence[str], text: Sequence[str] = ()) -> Objective:
    """The objective of ``mode`` with the frozen towers named ``frozen`` (config order), of
    which ``text`` read captions. A text tower t has the same heads and terms as an image
    tower (z_t from the caption, W_f->t and W_g->t aligned with it)."""
    frozen, text = tuple(frozen), tuple(text)
    if not set(text) <= set(frozen):
        raise ValueError(f"text towers {list(text)} must be among the frozen towers {list(frozen)}")
    if mode == "clip":  # a clip model never builds, loads or runs a frozen tower
        return Objective(mode, True, (), (), (Term(MAIN_TERM, Z_F, Z_G, False),))
    if mode == "lit":
        if len(frozen) != 1:
            raise ValueError(
                f"lit locks one frozen tower in the image tower's place, got {len(frozen)}: "
                f"{list(frozen)}; list exactly one"
            )
        (locked,) = frozen
        if text:  # a locked text tower takes g's place (OpenCLIP's --lock-text)
            term = Term(f"f_{locked}", Z_F, embedding(locked), False)
            return Objective(mode, True, frozen, (), (term,), text, trains_text_tower=False)
        return Objective(
            mode, False, frozen, (), (Term(f"{locked}_g", embedding(locked), Z_G, False),)
        )
    if mode == "3t":
        if not frozen:
            raise ValueError("3t needs at least one frozen tower to align f and g with")
        terms = [Term(MAIN_TERM, Z_F, Z_G, False)]
        for name in frozen:
            on_f, on_g = alignment_names(name)
            terms += [
                Term(f"{on_f}_{name}", embedding(on_f), embedding(name), True),
                Term(f"{on_g}_{name}", embedding(on_g), embedding(name), True),
            ]
        return Objective(mode, True, frozen, frozen, tuple(terms), text)
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
