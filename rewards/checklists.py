"""Yes/no questions and checklists from prompt metadata: GenEval, GenEval++ and TIIF.

Question-based rewards (the VLM judge, self-consistency) need, for every prompt, questions whose
expected answer is known.  TIIF records carry them (``yn_question_list`` / ``yn_answer_list``);
for GenEval and GenEval++ records they are derived from the ``include`` / ``exclude`` clauses, one
question per checkable fact (presence with colour and count, relative position, region, size, absence).
The GenEval++ checklist is the same facts as short statements, for judges asked for one verdict.
Phrasing is ours; what is asked follows GenEval's rules (see :mod:`r3_rl.rewards.geneval_rules`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError
from r3_rl.jsonl import read_jsonl_objects
from r3_rl.rewards.geneval_rules import validate_metadata

YES, NO = "yes", "no"
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_SAME_PLURAL = {"sheep", "skis", "scissors", "broccoli", "glasses", "fish", "deer"}
_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "man": "men", "woman": "women", "child": "children"}
_RELATION = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_REGION = {"left": "left half", "right": "right half", "above": "top half", "below": "bottom half"}


@dataclass(frozen=True)
class YesNo:
    """A question about an image and the answer a faithful image gives (``"yes"`` or ``"no"``).

    ``check``: for questions derived from a GenEval clause, GenEval metadata holding that clause alone,
    phrased so the truth about *any* image is "yes" exactly when a GenEval-style reward judges the image
    correct on it (what understanding metrics compare answers with); ``None`` for TIIF's own questions.
    """

    question: str
    answer: str
    check: dict[str, Any] | None = field(default=None, compare=False)


def number_word(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def plural(noun: str) -> str:
    """English plural of the last word of ``noun`` ("wine glass" -> "wine glasses")."""
    head, _, last = noun.rpartition(" ")
    if last in _SAME_PLURAL:
        word = last
    elif last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _noun(req: dict[str, Any], size: bool = False) -> str:
    """"red car" (with ``size``: "larger red car")."""
    return " ".join(w for w in (req.get("size") if size else None, req.get("color"), req["class"]) if w)


def _counted(req: dict[str, Any], size: bool = False) -> str:
    """"a red car" / "three red cars"."""
    n, noun = req["count"], _noun(req, size)
    return article(noun) if n == 1 else f"{number_word(n)} {plural(noun)}"


def _the(req: dict[str, Any]) -> tuple[str, str]:
    """("Is", "the red car") / ("Are", "the three red cars")."""
    n = req["count"]
    return ("Is", f"the {_noun(req)}") if n == 1 else ("Are", f"the {number_word(n)} {plural(_noun(req))}")


def _exact_classes(metadata: dict[str, Any]) -> set[tuple[str, int]]:
    """(class, count) pairs whose exclude clause (count + 1) makes the include an exact count."""
    return {(e["class"], e["count"] - 1) for e in metadata.get("exclude", [])}


def _clause(req: dict[str, Any]) -> dict[str, Any]:
    """An include clause's object alone: class, count and colour (no position / region / size)."""
    return {k: req[k] for k in ("class", "count", "color") if k in req}


def geneval_questions(metadata: dict[str, Any]) -> list[YesNo]:
    """Yes/no questions for GenEval / GenEval++ metadata (validated first: bad keys raise UserError)."""
    validate_metadata(metadata)
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    exact = _exact_classes(metadata)
    out: list[YesNo] = []
    for req in include:
        n = req["count"]
        plain = _clause(req)
        presence = {"include": [plain]}
        if (req["class"], n) in exact:
            presence["exclude"] = [{"class": req["class"], "count": n + 1}]
        if n == 1 and (req["class"], 1) in exact:
            out.append(YesNo(f"Is there exactly one {_noun(req)} in the image?", YES, presence))
        elif n == 1:
            out.append(YesNo(f"Is there {article(_noun(req))} in the image?", YES, presence))
        else:
            how = "exactly " if (req["class"], n) in exact else ""
            out.append(YesNo(f"Are there {how}{number_word(n)} {plural(_noun(req))} in the image?", YES, presence))
    for req in include:
        verb, subj = _the(req)
        if "position" in req:
            rel, j = req["position"]
            check = {"include": [_clause(include[j]), {**_clause(req), "position": [rel, 0]}]}
            out.append(YesNo(f"{verb} {subj} {_RELATION[rel]} the {_noun(include[j])}?", YES, check))
        if "region" in req:
            check = {"include": [{**_clause(req), "region": req["region"]}]}
            out.append(YesNo(f"{verb} {subj} in the {_REGION[req['region']]} of the image?", YES, check))
    for req in include:
        if req.get("size") != "larger":
            continue
        verb, subj = _the(req)
        for other in include:
            if other.get("size") == "smaller":
                check = {"include": [{**_clause(req), "size": "larger"}, {**_clause(other), "size": "smaller"}]}
                out.append(YesNo(f"{verb} {subj} larger than the {_noun(other)}?", YES, check))
    for req in exclude:
        if any(r["class"] == req["class"] and r["count"] == req["count"] - 1 for r in include):
            continue  # already asked as an exact count
        k = req["count"]
        q = (f"Is there {article(req['class'])} in the image?" if k == 1
             else f"Are there {number_word(k)} or more {plural(req['class'])} in the image?")
        out.append(YesNo(q, NO, {"include": [{"class": req["class"], "count": k}]}))
    if not out:
        raise UserError("metadata has no include/exclude clauses to ask about")
    return out


def geneval_checklist(metadata: dict[str, Any]) -> list[str]:
    """The expectations of a GenEval++ prompt as short statements, for a single-verdict judge."""
    validate_metadata(metadata)
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    exact = _exact_classes(metadata)
    items = []
    for req in include:
        s = _counted(req, size=True)
        if (req["class"], req["count"]) in exact:
            s = f"exactly {s}" if req["count"] > 1 else f"exactly one {_noun(req, size=True)}"
        if "position" in req:
            rel, j = req["position"]
            s += f" {_RELATION[rel]} the {_noun(include[j])}"
        if "region" in req:
            s += f" in the {_REGION[req['region']]} of the image"
        items.append(s)
    for req in exclude:
        if any(r["class"] == req["class"] and r["count"] == req["count"] - 1 for r in include):
            continue  # folded into "exactly n" above
        k = req["count"]
        items.append(f"no {plural(req['class'])}" if k == 1 else f"at most {number_word(k - 1)} "
                     f"{plural(req['class']) if k - 1 != 1 else req['class']}")
    if not items:
        raise UserError("metadata has no include/exclude clauses for a checklist")
    return items


def tiif_questions(metadata: dict[str, Any]) -> list[YesNo]:
    """TIIF's own questions and answers; answers are matched case-insensitively ("Yes" == "yes")."""
    qs, ans = metadata.get("yn_question_list"), metadata.get("yn_answer_list")
    if not isinstance(qs, list) or not isinstance(ans, list):
        raise UserError("TIIF metadata needs lists 'yn_question_list' and 'yn_answer_list'")
    if not qs or len(qs) != len(ans):
        raise UserError(f"TIIF metadata: {len(qs)} questions but {len(ans)} answers (need equal, non-zero)")
    out = []
    for i, (q, a) in enumerate(zip(qs, ans)):
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"TIIF metadata: yn_question_list[{i}] must be a non-empty string")
        a_norm = a.strip().lower() if isinstance(a, str) else None
        if a_norm not in (YES, NO):
            raise UserError(f"TIIF metadata: yn_answer_list[{i}] must be 'yes' or 'no', got {a!r}")
        out.append(YesNo(" ".join(q.split()), a_norm))
    return out


def questions_for(metadata: dict[str, Any]) -> list[YesNo]:
    """TIIF questions when the metadata has them, else questions derived from GenEval clauses."""
    if "yn_question_list" in metadata or "yn_answer_list" in metadata:
        return tiif_questions(metadata)
    if "include" in metadata or "exclude" in metadata:
        return geneval_questions(metadata)
    raise UserError("metadata has neither 'yn_question_list' (TIIF) nor 'include' (GenEval) to ask questions from")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a GenEval / GenEval++ / TIIF jsonl and check every record yields questions (file:line errors)."""
    path = Path(path)
    records = []  # a missing file, a directory or a FIFO: read_jsonl_objects' one-line error (textfiles.open_regular)
    for lineno, rec in read_jsonl_objects(path):
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "tag")}
        try:
            questions_for(meta)
            if "include" in meta:
                geneval_checklist(meta)
        except UserError as e:
            raise UserError(f"{path}:{lineno}: {e}") from None
        records.append(rec)
    return records
