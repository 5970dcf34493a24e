"""The captions of the embedded world: what a caption of an image (from ``render.compose``)
says and how. The words and phrase lists are the world's vocabulary; ``heldout.py`` builds
its open-vocabulary captions from the same grammar with words none of these use.
"""

from __future__ import annotations

import random

from threetowers.project.world.render import COLOURS, OBJECT_CLASSES

SIZE_WORDS = {"small": ["small", "small", "little", "tiny"], "large": ["large", "large", "big"]}
COLOUR_WORDS = {name: [name] for name in COLOURS} | {
    "purple": ["purple", "purple", "violet"],
    "cyan": ["cyan", "cyan", "turquoise"],
}
CLASS_WORDS = {name: [name, name] for name in OBJECT_CLASSES} | {
    "circle": ["circle", "circle", "disc"],
    "cross": ["cross", "cross", "plus sign"],
    "ring": ["ring", "ring", "hoop"],
    "diamond": ["diamond", "diamond", "rhombus"],
    "crescent": ["crescent", "crescent", "crescent moon"],
    "house": ["house", "house", "hut"],
}
_CORNER = ["in the {}", "at the {}", "in the {} corner"]
POSITION_PHRASES = {
    "top left": [p.format(w) for p in _CORNER for w in ("top left", "upper left")],
    "top": ["at the top", "near the top", "along the top edge"],
    "top right": [p.format(w) for p in _CORNER for w in ("top right", "upper right")],
    "left": ["on the left", "at the left", "on the left side"],
    "centre": ["in the centre", "in the middle", "near the centre"],
    "right": ["on the right", "at the right", "on the right side"],
    "bottom left": [p.format(w) for p in _CORNER for w in ("bottom left", "lower left")],
    "bottom": ["at the bottom", "near the bottom", "along the bottom edge"],
    "bottom right": [p.format(w) for p in _CORNER for w in ("bottom right", "lower right")],
}
# Per place: prepositions, noun phrases (the first names the place itself), and whether the
# scene names take an article.
PLACE_WORDS = {
    "grass": (["on"], ["grass", "a lawn", "a meadow"], False),
    "sand": (["on"], ["sand", "a beach", "sandy ground"], False),
    "water": (["on", "floating on"], ["water", "the water", "a lake"], False),
    "snow": (["on", "in"], ["snow", "snowy ground", "a snowfield"], False),
    "brick wall": (["in front of", "against"], ["a brick wall", "a wall of bricks"], True),
    "sky": (["against", "in"], ["the sky", "a sky background"], True),
    "forest": (["in", "in front of"], ["a forest", "the woods"], True),
    "road": (["on"], ["a road", "the street"], True),
    "wooden floor": (["on"], ["a wooden floor", "wooden planks"], True),
}
NUMBERS = {1: "one", 2: "two", 3: "three"}


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def place_phrase(meta: dict, py: random.Random, exact: bool = False) -> tuple[str, str]:
    """(preposition, noun phrase) naming the image's fine scene or its coarse place; with
    ``exact``, never a loose synonym such as "a lawn"."""
    preps, nouns, countable = PLACE_WORDS[meta["place"]]
    roll = py.random()
    if roll < 0.5:
        noun = with_article(meta["scene"]) if countable else meta["scene"]
    elif roll < 0.8 or exact:
        noun = nouns[0]  # the coarse place, as zero-shot place prompts name it
    else:
        noun = py.choice(nouns)
    return py.choice(preps), noun


def object_phrase(
    obj: dict,
    py: random.Random,
    size: bool,
    colour: bool,
    where: bool,
    article: bool = True,
    class_words: dict[str, list[str]] = CLASS_WORDS,
) -> str:
    words = []
    if size:
        words.append(py.choice(SIZE_WORDS[obj["size"]]))
    if colour:
        words.append(py.choice(COLOUR_WORDS[obj["colour"]]))
    words.append(py.choice(class_words[obj["class"]]))
    phrase = with_article(" ".join(words)) if article else " ".join(words)
    return f"{phrase} {py.choice(POSITION_PHRASES[obj['position']])}" if where else phrase


def join_phrases(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# How often an incomplete caption mentions each attribute (for all of its objects at once);
# the object classes are always named. Real captions name the objects far more often than
# their attributes, and it matters for learning: a caption that names colour, position and
# place singles out its image in a batch without its shape words, so with attribute-rich
# captions a contrastive model can match almost every caption by colour, position and place
# and is slow to learn shapes. With these rates about one incomplete caption in seven names
# its objects by shape alone (and perhaps the place); the complete caption still names all.
MENTION_RATES = {"size": 0.4, "colour": 0.5, "position": 0.5, "place": 0.5}


def _caption(meta: dict, py: random.Random, complete: bool) -> str:
    """One caption. ``complete`` names every object with colour, size and position, and the
    place; otherwise each attribute is mentioned at its ``MENTION_RATES`` rate (real captions
    are incomplete)."""
    objects = list(meta["objects"])
    py.shuffle(objects)  # attribute order across objects varies
    rates = [MENTION_RATES[k] for k in ("size", "colour", "position", "place")]
    size, colour, where, place = (complete or py.random() < p for p in rates)
    prep, noun = place_phrase(meta, py, exact=complete)
    at = f" {prep} {noun}" if place else ""
    things = [object_phrase(o, py, size, colour, where) for o in objects]
    n = len(things)
    count = NUMBERS[n]
    kind = py.choice(["objects", "shapes", "things"]) if n > 1 else "object"
    others = "one other object" if n == 2 else "two other objects"
    choice = py.randrange(5 if complete else 7)
    # Templates are built lazily: only the chosen one is formatted.
    if n == 1:
        one = things[0]
        forms = [
            lambda: f"{one}{at}",
            lambda: f"there is {one}{at}",
            lambda: f"{noun} with {one}" if place else f"{one} in the picture",
            lambda: f"{at.strip()}, {one}" if place else f"a picture of {one}",
            lambda: f"a photo of {one}{at}",
            lambda: f"a simple drawing of {one}",  # incomplete forms from here on
            lambda: "one " + object_phrase(objects[0], py, size, colour, where, article=False),
        ]
    else:
        all_things = join_phrases(things)
        forms = [
            lambda: f"{count} {kind}{at}: {all_things}",
            lambda: f"{all_things}{at}",
            lambda: f"there are {count} {kind}{at}: {all_things}",
            lambda: f"{noun} with {all_things}" if place else f"a picture of {all_things}",
            lambda: f"{things[0]}{at}, together with {join_phrases(things[1:])}",
            lambda: f"{count} {kind}{at}, including {things[0]}",
            lambda: f"{things[0]} and {others}{at}",
        ]
    return forms[choice]().strip()


def captions(meta: dict, rng, n: int) -> list[str]:
    """``n`` captions for ``meta`` (from ``render``); ``rng`` is a ``random.Random`` or a numpy
    ``Generator``. One caption, at a random index, is complete (every object with colour, size,
    position, and the place), so the set always covers what a class label leaves out; the
    others omit attributes at random but always name at least one object class."""
    py = rng if isinstance(rng, random.Random) else random.Random(int(rng.integers(1 << 62)))
    full = py.randrange(n) if n else -1
    return [_caption(meta, py, i == full) for i in range(n)]
