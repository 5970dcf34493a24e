"""Words no training caption uses: the world's open-vocabulary benchmark sets.

A text tower trained from scratch on the world's captions has never seen these words, so it
can only guess at a query that uses them; a frozen pretrained text tower (MiniLM) knows
English and may map "a cottage" near "a house". The sets measure that:

- zero-shot on the object images with one held-out synonym per class and held-out sentence
  frames as prompts (``zeroshot_objects_heldout/``: its own classnames.txt and templates.txt,
  its ``val`` and ``test`` folders links to the ordinary object images);
- retrieval on the ordinary retrieval images, re-captioned with held-out object and place
  nouns in held-out sentence frames (``retrieval/dataset_world_heldout.json``).

The synonyms were chosen by hand as plain English, before any model saw them; colour, size and
position words keep their training forms (they have few everyday synonyms), so what is new is
what names the things. ``tests/project/world/test_heldout.py`` proves that no held-out word occurs
in a training caption, nor contains a training word a subword tokenizer could piece it from.
"""

from __future__ import annotations

import random

from threetowers.project.world.captions import (
    MENTION_RATES,
    PLACE_WORDS,
    join_phrases,
    object_phrase,
)
from threetowers.project.world.render import OBJECT_CLASSES

HELDOUT_CLASS_WORDS = {
    "circle": "dot",
    "square": "box",
    "triangle": "pyramid",
    "star": "pentagram",
    "cross": "crucifix",
    "heart": "love symbol",
    "ring": "donut",
    "diamond": "lozenge",
    "arrow": "pointer",
    "crescent": "sickle",
    "house": "cottage",
    "tree": "fir",
}
HELDOUT_PLACE_WORDS = {
    "grass": "turf",
    "sand": "dunes",
    "water": "the sea",
    "snow": "a glacier",
    "brick wall": "masonry",
    "sky": "the heavens",
    "forest": "a jungle",
    "road": "a highway",
    "wooden floor": "parquet",
}
# Sentence frames no training caption or ordinary prompt has; "{}" takes the objects.
HELDOUT_FRAMES = (
    "a snapshot showing {}",
    "this illustration features {}",
    "visible here: {}",
)
# The zero-shot prompts: a frame around "one <synonym>".
HELDOUT_TEMPLATES = [frame.format("one {}") + "." for frame in HELDOUT_FRAMES]
HELDOUT_CLASSNAMES = [HELDOUT_CLASS_WORDS[name] for name in OBJECT_CLASSES]

_WORDS = {name: [word] for name, word in HELDOUT_CLASS_WORDS.items()}


def heldout_captions(meta: dict, seed: int, n: int) -> list[str]:
    """``n`` held-out captions of a rendered sample's ``meta`` (from ``spec.render``),
    drawn from their own random stream ``seed`` so the ordinary captions stay as they are.
    As with those, one caption at a random index names every object with size, colour and
    position, and the place; the others mention each at the training captions' rates."""
    py = random.Random(seed)
    full = py.randrange(n) if n else -1
    return [_caption(meta, py, i == full) for i in range(n)]


def _caption(meta: dict, py: random.Random, complete: bool) -> str:
    objects = list(meta["objects"])
    py.shuffle(objects)
    rates = [MENTION_RATES[k] for k in ("size", "colour", "position", "place")]
    size, colour, where, place = (complete or py.random() < p for p in rates)
    things = [object_phrase(o, py, size, colour, where, class_words=_WORDS) for o in objects]
    preps = PLACE_WORDS[meta["place"]][0]
    at = f" {py.choice(preps)} {HELDOUT_PLACE_WORDS[meta['place']]}" if place else ""
    return py.choice(HELDOUT_FRAMES).format(join_phrases(things) + at)
