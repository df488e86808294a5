"""Prompt loaders: GenEval / GenEval++ / TIIF jsonl, `datasets` datasets, file:line errors, held-out subsets."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from r3_rl.config import load_recipe
from r3_rl.data import PromptSource, held_out_subset, load_prompts, read_hf_prompts, read_jsonl_prompts
from r3_rl.errors import UserError

GENEVAL = {"tag": "position", "include": [{"class": "cow", "count": 1},
                                          {"class": "dog", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a dog left of a cow"}
TIIF = {"type": "color+2d", "short_description": "A red cup left of a pig.", "long_description": "Long text.",
        "yn_question_list": ["Is there a cup?", "Is the cup red?"], "yn_answer_list": ["Yes", "no"]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_shared_geneval_files_load(shared_data: Path) -> None:
    sizes = {"train_geneval.jsonl": 12359, "test_geneval.jsonl": 2212, "test_geneval_553.jsonl": 553,
             "test_geneval++.jsonl": 280}
    for name, n in sizes.items():
        items = read_jsonl_prompts(shared_data / "geneval" / name, "geneval")
        assert len(items) == n
    plus = read_jsonl_prompts(shared_data / "geneval" / "test_geneval++.jsonl", "geneval")
    tags = {it.metadata["tag"] for it in plus}
    assert {"size_spatial_attr", "spatial_count_attr", "multi_object_count_attr"} <= tags
    sized = next(it for it in plus if it.metadata["tag"] == "size_spatial_attr")
    assert {"size", "region"} <= set(sized.metadata["include"][0]) and "prompt" not in sized.metadata
    assert sized.id == "test_geneval++:" + str(1 + plus.index(sized))  # id = file stem : line number


def test_shared_tiif_files_load(shared_data: Path) -> None:
    items = read_jsonl_prompts(shared_data / "tiif" / "test_TIIF.jsonl", "tiif")
    assert len(items) == 277
    assert all(a in ("yes", "no") for it in items for a in it.metadata["yn_answer_list"])
    assert items[0].prompt == "A cat is situated beneath a microwave." and items[0].metadata["tag"] == "2d_spatial_relation"
    assert len(read_jsonl_prompts(shared_data / "tiif" / "train_TIIF.jsonl", "tiif")) == 2261


def test_tiif_normalises_answers_and_can_use_long_description(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", [TIIF])
    (item,) = read_jsonl_prompts(p, "tiif")
    assert item.prompt == "A red cup left of a pig." and item.metadata["yn_answer_list"] == ["yes", "no"]
    assert item.metadata["tag"] == "color+2d" and "short_description" not in item.metadata
    (long,) = read_jsonl_prompts(p, "tiif", prompt_column="long_description")
    assert long.prompt == "Long text." and long.metadata["short_description"] == TIIF["short_description"]


@pytest.mark.parametrize("kind, bad, message", [
    ("geneval", "{not json", r"b.jsonl:3: not valid JSON"),
    ("geneval", [1, 2], r"b.jsonl:3: expected a JSON object, got list"),
    ("geneval", {"tag": "x"}, r"b.jsonl:3: missing prompt text"),
    ("geneval", {"prompt": "p", "include": [{"class": "cow"}]}, r"b.jsonl:3: metadata include\[0\] needs an integer"),
    ("geneval", {"prompt": "p", "include": [{"class": "cow", "count": 1, "colour": "red"}]},
     r"b.jsonl:3: .*unknown key\(s\) \['colour'\]"),
    ("geneval", {"prompt": "p", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1,
                                                                          "region": "middle"}]},
     r"b.jsonl:3: .*'region' must be one of"),
    ("geneval", {"prompt": "p", "tag": 3}, r"b.jsonl:3: 'tag' must be a string"),
    ("tiif", dict(TIIF, yn_answer_list=["yes"]), r"b.jsonl:3: TIIF record needs"),
    ("tiif", dict(TIIF, yn_answer_list=["yes", "maybe"]), r"b.jsonl:3: .*must be yes/no, got 'maybe'"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, kind: str, bad: object, message: str) -> None:
    good = GENEVAL if kind == "geneval" else TIIF
    p = write_jsonl(tmp_path / "b.jsonl", [good, "", bad])  # line 2 is blank (allowed)
    with pytest.raises(UserError, match=message):
        read_jsonl_prompts(p, kind)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="prompt file not found"):
        read_jsonl_prompts(tmp_path / "nope.jsonl", "geneval")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no prompts"):
        read_jsonl_prompts(tmp_path / "e.jsonl", "geneval")


def test_datasets_disk_dict_file_and_errors(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a cat", "a dog"], "tag": ["x", "y"], "n": [1, 2]}),
        "test": datasets.Dataset.from_dict({"text": ["a cow"], "tag": ["z"], "n": [3]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    train = read_hf_prompts(str(tmp_path / "dd"), "text", "train")
    assert [i.prompt for i in train] == ["a cat", "a dog"] and train[1].metadata == {"tag": "y", "n": 2}
    assert [i.prompt for i in read_hf_prompts(str(tmp_path / "dd"), "text", "test")] == ["a cow"]
    # the split is in the id: row 0 of train and row 0 of test were both "dd:0"
    assert [i.id for i in train] == ["dd:train:0", "dd:train:1"]
    assert [i.id for i in read_hf_prompts(str(tmp_path / "dd"), "text", "test")] == ["dd:test:0"]
    with pytest.raises(UserError, match=r"no split 'validation' \(splits: train, test\)"):
        read_hf_prompts(str(tmp_path / "dd"), "text", "validation")
    with pytest.raises(UserError, match=r"data.prompt_column: 'prompt' not in dataset"):
        read_hf_prompts(str(tmp_path / "dd"), "prompt", "train")
    dd["train"].save_to_disk(str(tmp_path / "single"))  # a plain Dataset folder: the split is irrelevant
    assert [i.id for i in read_hf_prompts(str(tmp_path / "single"), "text", "test")] == ["single:0", "single:1"]

    p = write_jsonl(tmp_path / "local.jsonl", [{"prompt": "one", "tag": "t"}, {"prompt": "", "tag": "t"}])
    with pytest.raises(UserError, match=r"row 1: 'prompt' must be a non-empty string"):
        load_prompts("hf", str(p), "prompt")
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "one"}])
    assert [i.id for i in load_prompts("hf", str(one), "prompt", "test")] == ["one.jsonl:0"]  # a file has no split
    with pytest.raises(UserError, match=r"dataset 'no/such-dataset-r3rl' \(split 'train'\): cannot load"):
        read_hf_prompts("no/such-dataset-r3rl", "prompt", "train")


def test_held_out_subset_is_seeded_and_ordered() -> None:
    items = list(range(100))
    a = held_out_subset(items, 10, seed=0)  # type: ignore[arg-type]
    assert a == held_out_subset(items, 10, seed=0) and a == sorted(a) and len(set(a)) == 10  # type: ignore[arg-type]
    assert a != held_out_subset(items, 10, seed=1)  # type: ignore[arg-type]
    assert held_out_subset(items, 500, seed=0) == items  # type: ignore[arg-type]


def test_prompt_source_eval(tmp_path: Path, repo: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [GENEVAL] * 3)
    test = write_jsonl(tmp_path / "test.jsonl", [dict(GENEVAL, prompt=f"p{i}", tag=f"t{i % 3}") for i in range(30)])
    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml",
                         ["data.source=geneval", f"data.train={train}", f"data.eval={test}"])
    src = PromptSource(recipe)
    ev = src.eval_prompts(12)
    assert len(ev) == 12 and ev == src.eval_prompts(12)
    assert len({p.metadata["tag"] for p in ev}) == 3  # a random subset, not the first lines
    no_eval = load_recipe(repo / "recipes" / "tiny_blocks.yaml", ["data.source=geneval", f"data.train={train}"])
    with pytest.raises(UserError, match="data.eval: required for data.source='geneval'"):
        PromptSource(no_eval).eval_prompts(4)
    assert PromptSource(SimpleNamespace(seed=0, data=no_eval.data)).next_batch(4)[3].prompt == GENEVAL["prompt"]
