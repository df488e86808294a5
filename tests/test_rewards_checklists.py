"""Questions and checklists from GenEval / GenEval++ / TIIF metadata; every shared data record is usable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r3_rl.errors import UserError
from r3_rl.rewards.checklists import (YesNo, geneval_checklist, geneval_questions, load_records, number_word, plural,
                                      questions_for, tiif_questions)


def test_plural_and_numbers() -> None:
    assert [plural(w) for w in ("wine glass", "bus", "knife", "person", "computer mouse", "skis", "sheep", "toothbrush",
                                "teddy bear", "couch", "tv", "broccoli", "strawberry")] == [
        "wine glasses", "buses", "knives", "people", "computer mice", "skis", "sheep", "toothbrushes",
        "teddy bears", "couches", "tvs", "broccoli", "strawberries"]
    assert number_word(4) == "four" and number_word(15) == "15"


def test_geneval_questions_exact() -> None:
    position = {"include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    assert geneval_questions(position) == [
        YesNo("Is there a laptop in the image?", "yes"), YesNo("Is there a cow in the image?", "yes"),
        YesNo("Is the cow to the right of the laptop?", "yes")]
    counting = {"include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", "count": 3}]}
    assert geneval_questions(counting) == [YesNo("Are there exactly two wine glasses in the image?", "yes")]
    assert geneval_checklist(counting) == ["exactly two wine glasses"]
    one = {"include": [{"class": "apple", "count": 1}], "exclude": [{"class": "apple", "count": 2}]}
    assert geneval_questions(one) == [YesNo("Is there exactly one apple in the image?", "yes")]
    absent = {"include": [{"class": "cat", "count": 1, "color": "orange"}], "exclude": [{"class": "dog", "count": 1},
                                                                                       {"class": "bird", "count": 3}]}
    assert geneval_questions(absent) == [YesNo("Is there an orange cat in the image?", "yes"),
                                         YesNo("Is there a dog in the image?", "no"),
                                         YesNo("Are there three or more birds in the image?", "no")]
    assert geneval_checklist(absent) == ["an orange cat", "no dogs", "at most two birds"]


def test_geneval_plus_region_and_size() -> None:
    meta = {"include": [{"class": "apple", "count": 1, "size": "larger", "region": "above"},
                        {"class": "clock", "count": 3, "size": "smaller", "region": "below", "color": "green"}]}
    qs = geneval_questions(meta)
    assert YesNo("Is the apple in the top half of the image?", "yes") in qs
    assert YesNo("Are the three green clocks in the bottom half of the image?", "yes") in qs
    assert YesNo("Is the apple larger than the green clock?", "yes") in qs
    assert geneval_checklist(meta) == ["a larger apple in the top half of the image",
                                       "three smaller green clocks in the bottom half of the image"]


def test_tiif_questions_match_case_insensitively_and_validate() -> None:
    meta = {"yn_question_list": ["Is there a cat?  ", "Is it  red?"], "yn_answer_list": ["Yes", " no "]}
    assert tiif_questions(meta) == [YesNo("Is there a cat?", "yes"), YesNo("Is it red?", "no")]
    assert questions_for(meta) == tiif_questions(meta)
    with pytest.raises(UserError, match="2 questions but 1 answers"):
        tiif_questions({"yn_question_list": ["a?", "b?"], "yn_answer_list": ["yes"]})
    with pytest.raises(UserError, match=r"yn_answer_list\[0\] must be 'yes' or 'no'"):
        tiif_questions({"yn_question_list": ["a?"], "yn_answer_list": ["maybe"]})
    with pytest.raises(UserError, match="neither"):
        questions_for({"tag": "x"})


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "x", "include": [{"class": "cat", "count": 1}]}\n{oops', ":2: not valid JSON"),
    ('{"prompt": "x", "include": [{"class": "cat", "cnt": 1}]}', ":1: metadata include[0] has unknown key(s) ['cnt']"),
    ('{"prompt": "x", "include": [{"class": "cat", "count": 0}]}', ":1: metadata include[0] needs an integer 'count' >= 1"),
    ('{"type": "t", "yn_question_list": ["q?"], "yn_answer_list": ["perhaps"]}', ":1: TIIF metadata"),
    ('[1, 2]', ":1: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(UserError) as e:
        load_records(p)
    assert str(p) + needle in str(e.value) and "\n" not in str(e.value)


def test_every_shared_record_gets_questions_and_checklist(shared_data: Path) -> None:
    files = sorted(shared_data.glob("geneval/*.jsonl")) + sorted(shared_data.glob("tiif/*.jsonl"))
    assert len(files) >= 6
    total = 0
    for f in files:
        records = load_records(f)
        assert len(records) == sum(1 for line in f.read_text().splitlines() if line.strip())
        for rec in records:
            meta = {k: v for k, v in rec.items() if k != "prompt"}
            qs = questions_for(meta)
            assert qs and all(q.question.strip() and q.answer in ("yes", "no") for q in qs)
            if "include" in meta:
                assert len(qs) >= len(meta["include"]) and all(q.question.endswith("?") for q in qs)
                assert len(geneval_checklist(meta)) >= len(meta["include"])
            else:
                assert len(qs) == len(meta["yn_question_list"])
            total += 1
    assert total > 17000
    json.dumps([q.__dict__ for q in qs])  # questions are plain data (go over HTTP to judges)


@pytest.mark.parametrize("mode", ["checklist", "questions"])
def test_a_vlm_judge_on_geneval_plus_plus_names_its_mode(mode: str) -> None:
    """GenEval++ prompts with a judge that names its mode validate (the default is refused: tests/test_hostile_recipes)."""
    from pathlib import Path

    from r3_rl.config import load_recipe
    from r3_rl.validate import check_judge_protocol

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml", [
        "data.source=geneval", "data.train=geneval:train", "data.eval=geneval++:test",
        f"rewards.eval=[{{name: vlm_judge, options: {{url: 'http://127.0.0.1:9', model: m, mode: {mode}}}}}]"])
    check_judge_protocol(recipe, "SRC")
