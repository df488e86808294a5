"""Prompt sets shipped with the package: the published sizes, byte-identical to the reference files, usable by
name in a recipe (data.source inferred), and `r3-rl data`."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.data import PromptSource, builtin_summary, load_prompts
from r3_rl.errors import UserError
from r3_rl.prompt_sets import BUILTIN

# The sizes the R3 paper's data folder and GenEval / TIIF-Bench publish (issue 18).
SIZES = {"geneval:train": 12359, "geneval:test": 2212, "geneval:test553": 553, "geneval++:test": 280,
         "tiif:train": 2261, "tiif:test": 277}
ORIGINALS = {"geneval:train": "geneval/train_geneval.jsonl", "geneval:test": "geneval/test_geneval.jsonl",
             "geneval:test553": "geneval/test_geneval_553.jsonl", "geneval++:test": "geneval/test_geneval++.jsonl",
             "tiif:train": "tiif/train_TIIF.jsonl", "tiif:test": "tiif/test_TIIF.jsonl"}


def recipe_file(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"data": data}))  # JSON is YAML
    return p


def test_builtin_sets_load_with_the_published_sizes_and_tags() -> None:
    summary = {s.name: (n, tags) for s, n, tags in builtin_summary()}
    assert {k: n for k, (n, _) in summary.items()} == SIZES
    n, tags = summary["geneval:test553"]
    assert set(tags) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert sum(tags.values()) == n
    assert set(summary["geneval++:test"][1].values()) == {40} and len(summary["geneval++:test"][1]) == 7
    assert summary["geneval:test"][1] == Counter({t: 4 * c for t, c in tags.items()})  # 553 prompts x 4
    tiif = load_prompts("tiif", "tiif:test")
    assert all(a in ("yes", "no") for it in tiif for a in it.metadata["yn_answer_list"])  # "Yes" normalised
    assert tiif[0].id == "tiif:test:1" and tiif[0].source == "tiif:test"


def test_shipped_files_are_the_reference_files_byte_for_byte(shared_data: Path) -> None:
    for name, original in ORIGINALS.items():
        assert gzip.decompress(BUILTIN[name].path.read_bytes()) == (shared_data / original).read_bytes(), name


def test_attribution_sits_next_to_the_files() -> None:
    readme = (BUILTIN["geneval:train"].path.parents[1] / "README.md").read_text()
    assert "sen-ye/R3" in readme and "Apache-2.0" in readme and "e9912ac5fe9dd24f6429ed2c8719fb76f44d355f" in readme
    assert all(f"`{name}`" in readme for name in BUILTIN)


@pytest.mark.parametrize("data, source", [
    ({"train": "geneval:train", "eval": "geneval:test553"}, "geneval"),
    ({"train": "tiif:train", "eval": "tiif:test"}, "tiif"),
    ({"source": "geneval", "train": "geneval:train", "eval": "geneval++:test"}, "geneval"),
])
def test_builtin_names_set_the_source(tmp_path: Path, data: dict, source: str) -> None:
    assert load_recipe(recipe_file(tmp_path, data)).data.source == source


@pytest.mark.parametrize("data, needle", [
    ({"source": "tiif", "train": "geneval:train"}, "is a geneval-format prompt set but data.source is 'tiif'"),
    ({"source": "blocks", "eval": "geneval:test553"}, "but data.source is 'blocks'"),
    ({"train": "geneval:train", "eval": "tiif:test"}, "different formats"),
    ({"train": "geneval:tset"}, "unknown built-in prompt set 'geneval:tset' (did you mean 'geneval:test'?)"),
])
def test_inconsistent_or_misspelt_names_are_one_line_errors(tmp_path: Path, data: dict, needle: str) -> None:
    with pytest.raises(UserError) as e:
        load_recipe(recipe_file(tmp_path, data))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_geneval_recipe_reads_the_shipped_sets(repo: Path) -> None:
    recipe = load_recipe(repo / "recipes" / "grpo_geneval.yaml")
    assert (recipe.data.train, recipe.data.eval) == ("geneval:train", "geneval:test553")
    src = PromptSource(recipe)
    assert len(src.train_items) == SIZES["geneval:train"] and src.train_items[0].id == "geneval:train:1"
    held_out = src.eval_prompts(recipe.data.eval_size)
    assert len(held_out) == 553 and len({it.prompt for it in held_out}) == 553


def test_paths_and_gzipped_paths_still_work(tmp_path: Path) -> None:
    rec = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps(rec) + "\n")
    packed = tmp_path / "p.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = load_prompts("geneval", str(plain)), load_prompts("geneval", str(packed))
    assert a[0].prompt == b[0].prompt == "a photo of a cat" and a[0].id == b[0].id == "p:1"
    assert b[0].source == str(packed)
    broken = tmp_path / "q.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(UserError, match="not a valid gzip file"):
        load_prompts("geneval", str(broken))


def test_data_command_lists_sizes_and_tags(capsys: pytest.CaptureFixture) -> None:
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    for name, n in SIZES.items():
        assert any(line.startswith(name + " ") and f"{n:,} prompts" in line for line in out.splitlines()), name
    assert "color_attr" in out and "+31 more (r3-rl data tiif:train)" in out
    assert main(["data", "tiif:test"]) == 0
    assert "39 tags:" in capsys.readouterr().out
    assert main(["data", "tiif:tset"]) == 2
    assert "did you mean 'tiif:test'" in capsys.readouterr().err
