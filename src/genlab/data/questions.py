"""CLEVR's questions on scene graphs: templates, programs, the program interpreter, and captions.

Everything here works on a scene graph in CLEVR's scenes-JSON shape (a plain dict), so it serves
both the built-in shapes world (``genlab.data.shapes`` turns its scenes into such dicts) and real
CLEVR v1.0 scenes:

    {"objects": [{"color": "red", "size": "large", "shape": "cube", "material": "metal",
                  "3d_coords": [x, y, z], "pixel_coords": [px, py, depth], "rotation": 0.0}, ...],
     "relationships": {"left": [[indices of objects left of object 0], ...], "right": ..., "front": ...,
                       "behind": ...}, ...}

A question is a template (``FAMILIES``, its index is the ``question_family_index``) filled with
object descriptions, and a CLEVR program: a list of ``{"function", "inputs", "value_inputs"}`` nodes,
each reading the outputs of earlier nodes. ``execute_program(scene, program)`` runs a program on a
scene graph the way CLEVR's question engine does, so a question's answer is a function of the scene
graph and the program alone; generated questions take their answers from it.

Questions are chosen so that each one has one right answer: every "the <description>" names exactly
one object, and yes/no questions are asked with "yes" and "no" half the time each wherever the scene
allows both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# CLEVR's attribute vocabulary (its metadata.json), in the order descriptions name them.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": ("large", "small"),
    "color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
    "material": ("rubber", "metal"),
    "shape": ("cube", "sphere", "cylinder"),
}
RELATIONS: dict[str, str] = {"left": "left of", "right": "right of", "front": "in front of", "behind": "behind"}
MAX_COUNT = 10  # CLEVR scenes hold 3..10 objects: counts are the digits 0..10

# The kinds of question the shapes world asks (the recipes' --data.question-kinds).
QUESTION_KINDS: tuple[str, ...] = ("exist", "count", "query_attribute", "compare_attribute", "compare_integer",
                                   "spatial")

# CLEVR's five official categories, named by a program's last function.
CATEGORIES: dict[str, str] = {
    "exist": "exist", "count": "count",
    **{f"query_{a}": "query_attribute" for a in ATTRIBUTES},
    **{f"equal_{a}": "compare_attribute" for a in ATTRIBUTES},
    "equal_integer": "compare_integer", "less_than": "compare_integer", "greater_than": "compare_integer",
}


@dataclass(frozen=True)
class Family:
    """One question template: ``{a}`` / ``{b}`` are object descriptions, ``{rel}`` a relation phrase."""

    kind: str  # one of QUESTION_KINDS
    text: str
    last: str  # the program's last function


_Q = ("color", "shape", "size", "material")
FAMILIES: tuple[Family, ...] = (
    Family("exist", "are there any {a}s?", "exist"),  # 0
    Family("count", "how many {a}s are there?", "count"),  # 1
    *(Family("query_attribute", f"what {q} is the {{a}}?", f"query_{q}") for q in _Q),  # 2-5
    *(Family("compare_attribute", f"is the {{a}} the same {q} as the {{b}}?", f"equal_{q}") for q in _Q),  # 6-9
    Family("compare_integer", "are there more {a}s than {b}s?", "greater_than"),  # 10
    Family("compare_integer", "are there fewer {a}s than {b}s?", "less_than"),  # 11
    Family("compare_integer", "are there as many {a}s as {b}s?", "equal_integer"),  # 12
    *(Family("spatial", f"what {q} is the {{b}} {{rel}} the {{a}}?", f"query_{q}") for q in _Q),  # 13-16
    Family("spatial", "are there any {b}s {rel} the {a}?", "exist"),  # 17
    Family("spatial", "how many {b}s are {rel} the {a}?", "count"),  # 18
)


@dataclass(frozen=True)
class QA:
    """A question about a scene, its one-word answer, its kind (one of QUESTION_KINDS), its template's
    index in FAMILIES (CLEVR's question_family_index) and its CLEVR program."""

    question: str
    answer: str
    kind: str
    family_index: int
    program: tuple[dict, ...]


# ----------------------------------------------------------------------------- the program interpreter

def category(program: Sequence[dict]) -> str:
    """CLEVR's category of a program (exist, count, query_attribute, compare_attribute,
    compare_integer), from its last function; an unknown last function is returned as it is."""
    last = _function(program[-1])
    return CATEGORIES.get(last, last)


def _function(node: dict) -> str:
    return node.get("function", node.get("type"))  # older CLEVR files call it "type"


def execute_program(scene: dict, program: Sequence[dict]) -> str:
    """The answer a CLEVR program gives on a scene graph: "yes" / "no", a count as digits, or an
    attribute word. Follows CLEVR's question engine (scene, filter_*, unique, relate, same_*, union,
    intersect, count, exist, query_*, equal_*, equal_integer, less_than, greater_than). Raises
    ValueError when the program does not apply (``unique`` of no object or of several, an unknown
    function)."""
    objects, relations = scene["objects"], scene.get("relationships", {})
    out: list[Any] = []
    for k, node in enumerate(program):
        fn, args, values = _function(node), [out[i] for i in node.get("inputs", [])], node.get("value_inputs", [])
        if fn == "scene":
            value: Any = list(range(len(objects)))
        elif fn.startswith("filter_"):
            attr = fn[len("filter_"):]
            value = [i for i in args[0] if objects[i][attr] == values[0]]
        elif fn == "unique":
            if len(args[0]) != 1:
                raise ValueError(f"program node {k}: unique of {len(args[0])} objects")
            value = args[0][0]
        elif fn == "relate":
            value = sorted(relations[values[0]][args[0]])
        elif fn.startswith("same_"):
            attr = fn[len("same_"):]
            value = [i for i in range(len(objects)) if i != args[0] and objects[i][attr] == objects[args[0]][attr]]
        elif fn in ("union", "intersect"):
            a, b = set(args[0]), set(args[1])
            value = sorted(a | b if fn == "union" else a & b)
        elif fn == "count":
            value = len(args[0])
        elif fn == "exist":
            value = bool(args[0])
        elif fn.startswith("query_"):
            value = objects[args[0]][fn[len("query_"):]]
        elif fn.startswith("equal_") and fn != "equal_integer":
            value = args[0] == args[1]
        elif fn == "equal_integer":
            value = args[0] == args[1]
        elif fn == "less_than":
            value = args[0] < args[1]
        elif fn == "greater_than":
            value = args[0] > args[1]
        else:
            raise ValueError(f"program node {k}: unknown function {fn!r}")
        out.append(value)
    result = out[-1]
    if isinstance(result, bool):
        return "yes" if result else "no"
    return str(result)


# ----------------------------------------------------------------------------- descriptions and programs

Desc = dict  # {attribute: value}, a subset of ATTRIBUTES' keys


def phrase(desc: Desc) -> str:
    """ "large red metal cube" (attributes in CLEVR's order), "object" when no shape is named; the
    templates add the plural's "s" ("how many {a}s are there?")."""
    return " ".join([*(desc[a] for a in ("size", "color", "material") if a in desc), desc.get("shape", "object")])


def _node(function: str, inputs: list[int], value: str | None = None) -> dict:
    return {"function": function, "inputs": inputs, "value_inputs": [] if value is None else [value]}


def _select(program: list[dict], desc: Desc, start: int) -> int:
    """Append the filters of ``desc`` to ``program`` after node ``start``; returns the last node's index."""
    last = start
    for attr in ATTRIBUTES:
        if attr in desc:
            program.append(_node(f"filter_{attr}", [last], desc[attr]))
            last = len(program) - 1
    return last


def _matches(obj: dict, desc: Desc) -> bool:
    return all(obj[a] == v for a, v in desc.items())


def _count(objects: list[dict], among: Sequence[int], desc: Desc) -> int:
    return sum(_matches(objects[i], desc) for i in among)


def _subsets(obj: dict, exclude: str | None = None, min_size: int = 0) -> list[Desc]:
    attrs = [a for a in ATTRIBUTES if a != exclude]
    return [{a: obj[a] for a in combo} for n in range(min_size, len(attrs) + 1)
            for combo in itertools.combinations(attrs, n)]


def _unique_desc(objects: list[dict], i: int, among: Sequence[int], rng: np.random.Generator,
                 exclude: str | None = None) -> Desc | None:
    """A random description of object ``i`` (not naming ``exclude``) that fits no other object of ``among``."""
    found = [d for d in _subsets(objects[i], exclude) if _count(objects, among, d) == 1]
    return found[int(rng.integers(len(found)))] if found else None


def _random_desc(rng: np.random.Generator) -> Desc:
    """One to three random attributes (a description that may fit nothing)."""
    attrs = list(ATTRIBUTES)
    chosen = rng.choice(len(attrs), size=int(rng.integers(1, 4)), replace=False)
    return {attrs[k]: ATTRIBUTES[attrs[k]][int(rng.integers(len(ATTRIBUTES[attrs[k]])))] for k in sorted(chosen)}


def _pick(rng: np.random.Generator, seq: Sequence) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _yes_or_no(rng: np.random.Generator, yes: list, no: list) -> Any:
    """An item of ``yes`` or of ``no``, each side half the time when both have one (None if neither)."""
    if yes and no:
        return _pick(rng, yes if rng.random() < 0.5 else no)
    return _pick(rng, yes or no) if (yes or no) else None


def _exist_desc(objects: list[dict], among: Sequence[int], rng: np.random.Generator) -> Desc:
    """A description for "are there any ...?": one that fits an object of ``among`` or one that fits
    none, half the time each when both can be found."""
    yes = [d for i in among for d in _subsets(objects[i], min_size=1)]
    no = [d for d in (_random_desc(rng) for _ in range(20)) if _count(objects, among, d) == 0]
    return _yes_or_no(rng, yes, no)


# ----------------------------------------------------------------------------- the templates

def _qa(scene: dict, index: int, program: list[dict], **fill: str) -> QA:
    family = FAMILIES[index]
    return QA(family.text.format(**fill), execute_program(scene, program), family.kind, index, tuple(program))


def _ask_exist(scene: dict, rng: np.random.Generator) -> QA | None:
    objects = scene["objects"]
    desc = _exist_desc(objects, range(len(objects)), rng)
    program = [_node("scene", [])]
    program.append(_node("exist", [_select(program, desc, 0)]))
    return _qa(scene, 0, program, a=phrase(desc))


def _ask_count(scene: dict, rng: np.random.Generator) -> QA | None:
    objects = scene["objects"]
    desc = _pick(rng, _subsets(_pick(rng, objects))) if rng.random() < 0.7 else _random_desc(rng)
    program = [_node("scene", [])]
    program.append(_node("count", [_select(program, desc, 0)]))
    return _qa(scene, 1, program, a=phrase(desc))


def _ask_query(scene: dict, rng: np.random.Generator) -> QA | None:
    objects, q = scene["objects"], int(rng.integers(len(_Q)))
    everyone = range(len(objects))
    found = [(i, d) for i in everyone if (d := _unique_desc(objects, i, everyone, rng, exclude=_Q[q])) is not None]
    if not found:
        return None
    _, desc = _pick(rng, found)
    program = [_node("scene", [])]
    program += [_node("unique", [_select(program, desc, 0)])]
    program.append(_node(f"query_{_Q[q]}", [len(program) - 1]))
    return _qa(scene, 2 + q, program, a=phrase(desc))


def _ask_compare(scene: dict, rng: np.random.Generator) -> QA | None:
    objects, q = scene["objects"], int(rng.integers(len(_Q)))
    attr, everyone = _Q[q], range(len(objects))
    descs = {i: d for i in everyone if (d := _unique_desc(objects, i, everyone, rng, exclude=attr)) is not None}
    pairs = [(i, j) for i in descs for j in descs if i != j]
    same = [p for p in pairs if objects[p[0]][attr] == objects[p[1]][attr]]
    pair = _yes_or_no(rng, same, [p for p in pairs if p not in same])
    if pair is None:
        return None
    program = [_node("scene", [])]
    heads = []
    for i in pair:
        program.append(_node("unique", [_select(program, descs[i], 0)]))
        program.append(_node(f"query_{attr}", [len(program) - 1]))
        heads.append(len(program) - 1)
    program.append(_node(f"equal_{attr}", heads))
    return _qa(scene, 6 + q, program, a=phrase(descs[pair[0]]), b=phrase(descs[pair[1]]))


def _ask_compare_integer(scene: dict, rng: np.random.Generator) -> QA | None:
    objects, index = scene["objects"], int(rng.integers(10, 13))
    op = FAMILIES[index].last
    pool = [d for o in objects for d in _subsets(o, min_size=1)] + [_random_desc(rng) for _ in range(3)]
    everyone = range(len(objects))
    pairs = [(a, b) for a, b in (( _pick(rng, pool), _pick(rng, pool)) for _ in range(40)) if a != b]
    n = {id(d): _count(objects, everyone, d) for d in pool}
    holds = {"greater_than": lambda x, y: x > y, "less_than": lambda x, y: x < y,
             "equal_integer": lambda x, y: x == y}[op]
    yes = [p for p in pairs if holds(n[id(p[0])], n[id(p[1])])]
    pair = _yes_or_no(rng, yes, [p for p in pairs if p not in yes])
    if pair is None:
        return None
    program = [_node("scene", [])]
    heads = []
    for desc in pair:
        program.append(_node("count", [_select(program, desc, 0)]))
        heads.append(len(program) - 1)
    program.append(_node(op, heads))
    return _qa(scene, index, program, a=phrase(pair[0]), b=phrase(pair[1]))


def _ask_spatial(scene: dict, rng: np.random.Generator) -> QA | None:
    """ "what color is the cube left of the small sphere?" (or are there any / how many ... left of ...)."""
    objects = scene["objects"]
    everyone = range(len(objects))
    rel = _pick(rng, tuple(RELATIONS))
    anchors = {i: d for i in everyone if (d := _unique_desc(objects, i, everyone, rng)) is not None}
    anchors = {i: d for i, d in anchors.items() if scene["relationships"][rel][i]}  # something lies that way
    if not anchors:
        return None
    which = int(rng.integers(3))  # query an attribute / exist / count
    if which == 0:
        q = int(rng.integers(len(_Q)))
        found = []
        for a, adesc in anchors.items():
            related = scene["relationships"][rel][a]
            found += [(a, adesc, d) for t in related
                      if (d := _unique_desc(objects, t, related, rng, exclude=_Q[q])) is not None]
        if not found:
            return None
        a, adesc, desc = _pick(rng, found)
        index, tail = 13 + q, f"query_{_Q[q]}"
    else:
        a = _pick(rng, list(anchors))
        adesc, related = anchors[a], scene["relationships"][rel][a]
        if which == 1:
            desc, index, tail = _exist_desc(objects, related, rng), 17, "exist"
        else:
            desc = _pick(rng, _subsets(_pick(rng, objects))) if rng.random() < 0.7 else _random_desc(rng)
            index, tail = 18, "count"
    program = [_node("scene", [])]
    program.append(_node("unique", [_select(program, adesc, 0)]))
    program.append(_node("relate", [len(program) - 1], rel))
    last = _select(program, desc, len(program) - 1)
    if tail.startswith("query_"):
        program.append(_node("unique", [last]))
        last = len(program) - 1
    program.append(_node(tail, [last]))
    return _qa(scene, index, program, a=phrase(adesc), b=phrase(desc), rel=RELATIONS[rel])


_ASK = {"exist": _ask_exist, "count": _ask_count, "query_attribute": _ask_query, "compare_attribute": _ask_compare,
        "compare_integer": _ask_compare_integer, "spatial": _ask_spatial}


def check_kinds(kinds: Sequence[str]) -> None:
    unknown = sorted(set(kinds) - set(QUESTION_KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown question kinds {unknown}; known: {list(QUESTION_KINDS)}")


def ask(scene: dict, kind: str, rng: np.random.Generator) -> QA | None:
    """One random question of ``kind`` about the scene graph, or None when the scene cannot ask one
    unambiguously (e.g. no object has a unique description)."""
    check_kinds([kind])
    return _ASK[kind](scene, rng)


def make_questions(scene: dict, rng: np.random.Generator, kinds: Sequence[str] = QUESTION_KINDS) -> list[QA]:
    """One question of each kind in ``kinds`` (in that order) that the scene can ask."""
    check_kinds(kinds)
    return [qa for kind in kinds if (qa := _ASK[kind](scene, rng)) is not None]


def sample_questions(scene: dict, rng: np.random.Generator, n: int,
                     kinds: Sequence[str] = QUESTION_KINDS) -> list[QA]:
    """Up to ``n`` different questions, each of a kind drawn uniformly from ``kinds`` (4 n draws at most)."""
    check_kinds(kinds)
    out: list[QA] = []
    for _ in range(4 * n):
        if len(out) == n:
            break
        qa = _ASK[_pick(rng, list(kinds))](scene, rng)
        if qa is not None and all(qa.question != o.question for o in out):
            out.append(qa)
    return out


# ----------------------------------------------------------------------------- captions and words

def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: dict) -> list[str]:
    """Captions of a scene graph, the first one the full description:

    1. every object as "a <size> <color> <material> <shape>", left to right (by pixel x), e.g.
       "a large red metal cube and a small blue rubber sphere";
    2. the count: "there are 2 objects: 1 cube and 1 sphere";
    3. (two objects or more) "the leftmost object is a large red metal cube and the rightmost object is a
       small blue rubber sphere".
    """
    objects = sorted(scene["objects"], key=lambda o: o["pixel_coords"][0])
    if not objects:
        return ["there are 0 objects"]
    phrases = ["a " + phrase({a: o[a] for a in ATTRIBUTES}) for o in objects]
    n = len(objects)
    shapes = [(k, s) for s in ATTRIBUTES["shape"] if (k := sum(o["shape"] == s for o in objects))]
    out = [_listing(phrases),
           f"there {'is' if n == 1 else 'are'} {n} object{'s' * (n != 1)}: "
           + _listing([f"{k} {s}{'s' * (k != 1)}" for k, s in shapes])]
    if n > 1:
        out.append(f"the leftmost object is {phrases[0]} and the rightmost object is {phrases[-1]}")
    return out


def vocabulary() -> list[str]:
    """Every word a caption, question or answer can contain (sorted): the attribute words and their
    plurals, the numbers 0..MAX_COUNT, yes / no, and the words of the templates and captions."""
    words = {"a", "and", "yes", "no", "object", "objects", *(str(i) for i in range(MAX_COUNT + 1))}
    for values in ATTRIBUTES.values():
        words.update(values)
    words.update(s + "s" for s in ATTRIBUTES["shape"])
    for f in FAMILIES:
        words.update(f.text.replace("?", "").replace("{a}s", "").replace("{b}s", "").replace("{a}", "")
                     .replace("{b}", "").replace("{rel}", "").split())
    for text in [*RELATIONS.values(), "there is are the leftmost rightmost"]:
        words.update(text.split())
    return sorted(words)
