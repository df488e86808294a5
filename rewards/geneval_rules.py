"""GenEval's scoring rules as a pure function on detections.

Reproduces ``evaluate()`` of GenEval (djghosh13/geneval, ``evaluation/evaluate_images.py``) for the
``correct`` verdict and its reasons, and ``evaluate_reward()`` of Flow-GRPO's GenEval reward server
(yifan123/reward-server, ``reward_server/gen_eval.py``) for the partial-credit ``score`` and the
``strict_correct`` verdict.  Rewards train on ``score``; evaluation reports ``correct``.

Detection itself is NOT part of this module: confidence thresholds (GenEval: 0.3, 0.9 for counting),
the per-class cap (16), NMS and the colour classifier (CLIP in GenEval) belong to detector backends.
Detections arrive as a flat list; like GenEval we group them per label and order each group by
descending score (stable, so equal scores keep the detector's order): "first ``count``" means the most
confident ``count`` detections.

``correct`` (GenEval): include clauses AND-ed, exclude clauses OR-ed.  For each include ``{class,
count, color?, position?}`` the first ``count`` detections of the class must exist; if ``color`` is
given all of them must have it; if ``position = [rel, j]`` every one of them must stand in relation
``rel`` to every object of include ``j``'s matched group (a failed group ``j`` fails this clause).
An exclude ``{class, count}`` fails when the class has ``>= count`` detections.

``score`` (Flow-GRPO reward server, reproduced term for term, quirks included): a list of terms,
averaged.  Per include clause with ``n`` = ALL detections of the class and ``k = count``:
  * ``1 - |k - n| / k``  (can be negative: three squares when one is asked gives -1);
  * if ``n != k``: the clause is unmatched and, when it has a colour or position, one extra ``0``;
  * else colour: ``1 - |k - n_colour| / k``, unmatched unless ``n_colour == k``;
  * else position (clause still matched): ``0`` if the target group is unmatched; otherwise ``0`` at
    the first failing pair, and then -- as in the server, whose ``append(1.0)`` sits after the loop --
    a ``1`` in every case (a failed position contributes both ``0`` and ``1``).
Exclude clauses do not enter ``score``.  ``strict_correct`` is the server's exact-count verdict.

Extension (not in GenEval): GenEval++ metadata carries ``region`` (``left``/``right``/``above``/
``below``: every object's box centre lies in that half of the image; needs ``image_size``) and
``size`` (``larger``/``smaller``: every object's box area is larger/smaller than every object of
each include clause marked the opposite).  They are checked only on matched clauses, fail
``correct`` and ``strict_correct``, and add one ``1``/``0`` term each to ``score``.  GenEval records
never carry them, so GenEval/Flow-GRPO results are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from r3_rl.errors import UserError

# GenEval's colour names, in GenEval's order (used to order colour counts in reasons).
GENEVAL_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
REGIONS: tuple[str, ...] = ("left", "right", "above", "below")
SIZES: tuple[str, ...] = ("larger", "smaller")
INCLUDE_KEYS: frozenset[str] = frozenset({"class", "count", "color", "position", "region", "size"})
EXCLUDE_KEYS: frozenset[str] = frozenset({"class", "count"})


@dataclass
class Detection:
    """One detected object: class label, pixel box ``(x0, y0, x1, y1)``, confidence, colour name if known."""

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    color: str | None = None


@dataclass
class RuleResult:
    """GenEval's verdict (``correct``), Flow-GRPO's partial credit (``score``) and strict verdict, reasons."""

    correct: bool
    score: float
    reasons: list[str] = field(default_factory=list)
    strict_correct: bool = False


def relative_position(box_a: Any, box_b: Any, threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B, as GenEval computes them.

    The centre offset is shrunk per axis by ``threshold * (dim_a + dim_b)`` (a margin so touching or
    overlapping objects are not "left of" each other); a relation holds when its axis carries more than
    half of the (unshrunk) offset length.
    """
    boxes = np.array([box_a, box_b], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def group_detections(detections: list[Detection]) -> dict[str, list[Detection]]:
    """label -> detections by descending score (stable), GenEval's ``detected`` dict."""
    groups: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        groups.setdefault(det.label, []).append(det)
    return groups


def validate_metadata(metadata: dict[str, Any]) -> None:
    """Raise :class:`UserError` naming the offending key when metadata is not GenEval-shaped."""
    if not isinstance(metadata, dict):
        raise UserError(f"metadata must be a dict, got {type(metadata).__name__}")
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise UserError("metadata 'include' and 'exclude' must be lists of {class, count, ...} objects")
    for where, reqs, keys in (("include", include, INCLUDE_KEYS), ("exclude", exclude, EXCLUDE_KEYS)):
        for i, req in enumerate(reqs):
            at = f"metadata {where}[{i}]"
            if not isinstance(req, dict):
                raise UserError(f"{at} must be an object, got {type(req).__name__}")
            unknown = set(req) - keys
            if unknown:
                raise UserError(f"{at} has unknown key(s) {sorted(unknown)}; valid keys: {sorted(keys)}")
            if not isinstance(req.get("class"), str):
                raise UserError(f"{at} needs a string 'class'")
            if not isinstance(req.get("count"), int) or isinstance(req["count"], bool) or req["count"] < 1:
                raise UserError(f"{at} needs an integer 'count' >= 1, got {req.get('count')!r}")
            if "color" in req and not isinstance(req["color"], str):
                raise UserError(f"{at} 'color' must be a colour name, got {req['color']!r}")
            if "position" in req:
                pos = req["position"]
                if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                        or type(pos[1]) is not int or not 0 <= pos[1] < i):
                    raise UserError(f"{at} 'position' must be [relation, index of an earlier include] with "
                                    f"relation in {list(RELATIONS)}, got {pos!r}")
            if "region" in req and req["region"] not in REGIONS:
                raise UserError(f"{at} 'region' must be one of {list(REGIONS)}, got {req['region']!r}")
            if "size" in req and req["size"] not in SIZES:
                raise UserError(f"{at} 'size' must be one of {list(SIZES)}, got {req['size']!r}")
    for j, ex in enumerate(exclude):  # "fewer than n of a class" against includes asking for n or more of it
        asked = sum(req["count"] for req in include if req["class"] == ex["class"])
        if asked >= ex["count"]:
            raise UserError(f"metadata exclude[{j}] (fewer than {ex['count']} {ex['class']}) contradicts 'include', "
                            f"which asks for {asked}: no image can be judged correct")


def _area(det: Detection) -> float:
    x0, y0, x1, y1 = det.box
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def _in_region(det: Detection, region: str, image_size: tuple[int, int]) -> bool:
    w, h = image_size
    cx, cy = (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2
    return {"left": cx < w / 2, "right": cx > w / 2, "above": cy < h / 2, "below": cy > h / 2}[region]


def _size_ok(i: int, include: list[dict], groups: list[list[Detection] | None]) -> bool:
    """Every object of clause i is larger (smaller) than every object of each opposite-size clause."""
    mine = groups[i]
    assert mine is not None
    want = include[i]["size"]
    for j, other in enumerate(include):
        if j == i or other.get("size") in (None, want) or groups[j] is None:
            continue
        for a in mine:
            for b in groups[j]:  # type: ignore[union-attr]
                if (_area(a) <= _area(b)) if want == "larger" else (_area(a) >= _area(b)):
                    return False
    return True


def evaluate(
    detections: list[Detection],
    metadata: dict[str, Any],
    *,
    classify_color: Callable[[Detection], str] | None = None,
    position_threshold: float = 0.1,
    image_size: tuple[int, int] | None = None,
) -> RuleResult:
    """Score detections against GenEval metadata; see the module docstring for the exact rules.

    Colours come from ``Detection.color`` when set, else ``classify_color(det)``; a clause with a
    colour and neither raises ``ValueError``.  ``image_size = (width, height)`` is needed only by the
    GenEval++ ``region`` extension.
    """
    validate_metadata(metadata)
    include: list[dict] = metadata.get("include", [])
    if image_size is None and any("region" in r for r in include):
        raise UserError("metadata uses 'region' (GenEval++); evaluate() needs image_size=(width, height)")
    objects = group_detections(detections)
    color_cache: dict[int, str] = {}

    def color_of(det: Detection) -> str:
        if det.color is not None:
            return det.color
        if id(det) not in color_cache:
            if classify_color is None:
                raise ValueError(f"detection {det.label!r} at {det.box} has no colour and no classify_color was given")
            color_cache[id(det)] = classify_color(det)
        return color_cache[id(det)]

    def rels(a: Detection, b: Detection) -> set[str]:
        return relative_position(a.box, b.box, position_threshold)

    # ---- GenEval evaluate(): correct + reasons ----
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []
    for req in include:
        cls, k = req["class"], req["count"]
        found = objects.get(cls, [])[:k]
        matched = True
        if len(found) < k:
            correct = matched = False
            reasons.append(f"expected {cls}>={k}, found {len(found)}")
        else:
            if "color" in req:
                colors = [color_of(d) for d in found]
                if colors.count(req["color"]) < k:
                    correct = matched = False
                    order = list(GENEVAL_COLORS) + sorted(set(colors) - set(GENEVAL_COLORS))
                    reasons.append(
                        f"expected {req['color']} {cls}>={k}, found {colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in order if c in colors))
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tobj in groups[target]:  # type: ignore[union-attr]
                            true_rels = rels(obj, tobj)
                            if rel not in true_rels:
                                correct = matched = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
            if "region" in req and matched and not all(_in_region(d, req["region"], image_size) for d in found):  # type: ignore[arg-type]
                correct = matched = False
                reasons.append(f"expected {cls} in the {req['region']} region")
        groups.append(found if matched else None)
    for i, req in enumerate(include):
        if "size" in req and groups[i] is not None and not _size_ok(i, include, groups):
            correct = False
            reasons.append(f"expected {req['class']} to be {req['size']}")
    for req in metadata.get("exclude", []):
        cls = req["class"]
        if len(objects.get(cls, [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {cls}<{req['count']}, found {len(objects[cls])}")

    # ---- Flow-GRPO reward server evaluate_reward(): score + strict_correct ----
    strict, terms = True, []
    sgroups: list[list[Detection] | None] = []
    for req in include:
        cls, k = req["class"], req["count"]
        found = objects.get(cls, [])
        matched = True
        terms.append(1 - abs(k - len(found)) / k)
        if len(found) != k:
            strict = matched = False
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                n_col = [color_of(d) for d in found].count(req["color"])
                terms.append(1 - abs(k - n_col) / k)
                if n_col != k:
                    strict = matched = False
            if "position" in req and matched:
                rel, target = req["position"]
                if sgroups[target] is None:
                    strict = matched = False
                    terms.append(0.0)
                else:
                    for obj in found:
                        for tobj in sgroups[target]:  # type: ignore[union-attr]
                            if rel not in rels(obj, tobj):
                                strict = matched = False
                                terms.append(0.0)
                                break
                        if not matched:
                            break
                    terms.append(1.0)  # sic: the server appends 1.0 even after a failed pair
            if "region" in req and matched:
                ok = all(_in_region(d, req["region"], image_size) for d in found)  # type: ignore[arg-type]
                terms.append(float(ok))
                strict = strict and ok
                matched = ok
        sgroups.append(found if matched else None)
    for i, req in enumerate(include):
        if "size" in req and sgroups[i] is not None:
            ok = _size_ok(i, include, sgroups)
            terms.append(float(ok))
            strict = strict and ok
    score = sum(terms) / len(terms) if terms else 0.0
    return RuleResult(correct=correct, score=float(score), reasons=reasons, strict_correct=strict)
