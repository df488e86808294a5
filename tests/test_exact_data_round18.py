"""Exact checks on prompt data loading, text/gzip file limits, JSONL reading, trajectory dumps and weight-size
estimates (round 18 audit): each test pins one behaviour of r3_rl.data / textfiles / jsonl / trajectory / weights
that a one-point bug would change without any other test noticing."""
from __future__ import annotations

import base64
import gzip
import io
import json
import random
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.trajectory import Node, PromptItem, Segment, Tree, read_trees, write_trees

TIIF = {"type": "color", "short_description": "A red cup.", "yn_question_list": ["Is there a cup?"],
        "yn_answer_list": ["yes"]}


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _png_b64(value: int = 7, shape: tuple[int, int, int] = (2, 2, 3)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tree(context: dict | None = None, images: tuple = (), tree_id: str = "t0", meta: dict | None = None) -> Tree:
    t = Tree(id=tree_id, prompt=PromptItem(id="p", prompt="a red square"), meta=meta or {})
    seg = Segment("text", context if context is not None else {"input_ids": [1, 2]}, [3], [-0.5])
    t.add(Node(id="r0", parent=None, stage="reason", round=0, group_id="g", policy_version=0, segment=seg, text="x"))
    for i, img in enumerate(images):
        t.add(Node(id=f"g{i}", parent="r0", stage="generate", round=0, group_id="g/i", policy_version=0, image=img))
    return t


# ------------------------------------------------------------------------------------------------ data.py
def test_tiif_questions_are_stripped_and_the_default_tag_is_tiif(tmp_path: Path) -> None:
    from r3_rl.data import read_jsonl_prompts

    rec = {k: v for k, v in TIIF.items() if k != "type"}
    rec["yn_question_list"] = ["  Is there a cup? "]
    rec["yn_answer_list"] = [" YES "]
    (item,) = read_jsonl_prompts(_jsonl(tmp_path / "t.jsonl", [rec]), "tiif")
    assert item.metadata["yn_question_list"] == ["Is there a cup?"]
    assert item.metadata["yn_answer_list"] == ["yes"]
    assert item.metadata["tag"] == "tiif" and item.tag == "tiif"


def test_tiif_with_more_questions_than_answers_is_refused(tmp_path: Path) -> None:
    from r3_rl.data import read_jsonl_prompts

    rec = dict(TIIF, yn_question_list=["a?", "b?"], yn_answer_list=["yes"])
    with pytest.raises(UserError, match=r"t\.jsonl:1: TIIF record needs"):
        read_jsonl_prompts(_jsonl(tmp_path / "t.jsonl", [rec]), "tiif")
    rec = dict(TIIF, yn_question_list=[], yn_answer_list=[])
    with pytest.raises(UserError, match=r"t\.jsonl:1: TIIF record needs non-empty"):
        read_jsonl_prompts(_jsonl(tmp_path / "t.jsonl", [rec]), "tiif")
    rec = dict(TIIF, yn_question_list=["a?", "  "], yn_answer_list=["yes", "no"])
    with pytest.raises(UserError, match=r"t\.jsonl:1: 'yn_question_list' must hold non-empty strings"):
        read_jsonl_prompts(_jsonl(tmp_path / "t.jsonl", [rec]), "tiif")


def test_ids_are_line_numbers_counting_blank_lines_and_gz_drops_both_suffixes(tmp_path: Path) -> None:
    from r3_rl.data import read_jsonl_prompts

    text = "\n" + json.dumps({"prompt": " one "}) + "\n\n" + json.dumps({"prompt": "two", "tag": "t"}) + "\n"
    plain = tmp_path / "set.jsonl"
    plain.write_text(text)
    items = read_jsonl_prompts(plain, "geneval")
    assert [(it.id, it.prompt, it.source) for it in items] == [("set:2", "one", str(plain)), ("set:4", "two", str(plain))]
    gz = tmp_path / "other.jsonl.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert [it.id for it in read_jsonl_prompts(gz, "geneval")] == ["other:2", "other:4"]
    labelled = read_jsonl_prompts(plain, "geneval", label="geneval:x")
    assert [(it.id, it.source) for it in labelled] == [("geneval:x:2", "geneval:x"), ("geneval:x:4", "geneval:x")]


def test_a_file_of_blank_lines_has_no_prompts(tmp_path: Path) -> None:
    from r3_rl.data import read_jsonl_prompts

    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(UserError, match=r"empty\.jsonl: no prompts"):
        read_jsonl_prompts(p, "geneval")


def test_a_builtin_set_of_another_format_is_refused(tmp_path: Path) -> None:
    from r3_rl.data import load_prompts

    with pytest.raises(UserError, match=r"'tiif:test' is a tiif-format prompt set; set data.source: tiif"):
        load_prompts("geneval", "tiif:test")


def test_hf_prompts_strip_text_and_keep_other_json_columns_only(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    from r3_rl.data import read_hf_prompts

    p = _jsonl(tmp_path / "rows.jsonl", [{"text": " a cat ", "tag": "x"}, {"text": "a dog", "tag": "y"}])
    items = read_hf_prompts(str(p), "text")
    assert [(it.id, it.prompt, it.metadata, it.source) for it in items] == [
        ("rows.jsonl:0", "a cat", {"tag": "x"}, str(p)), ("rows.jsonl:1", "a dog", {"tag": "y"}, str(p))]


def test_a_missing_hf_file_and_a_gz_jsonl_are_read_as_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    from r3_rl.data import read_hf_prompts

    with pytest.raises(UserError, match=r"dataset .*nope\.jsonl: file not found"):
        read_hf_prompts(str(tmp_path / "nope.jsonl"), "text")
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a cat"}\n'))
    assert [(it.id, it.prompt) for it in read_hf_prompts(str(gz), "text")] == [("rows.jsonl.gz:0", "a cat")]


def test_a_saved_dataset_dict_names_its_split_and_refuses_a_missing_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    from r3_rl.data import read_hf_prompts

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
                          "test": datasets.Dataset.from_dict({"prompt": ["c"]})}).save_to_disk(str(folder))
    assert [it.id for it in read_hf_prompts(str(folder), "prompt", "test")] == ["dd:test:0"]
    with pytest.raises(UserError, match=r"no split 'valid' \(splits: train, test\)"):
        read_hf_prompts(str(folder), "prompt", "valid")
    import r3_rl.data

    # an empty dataset (datasets itself refuses to save or load most of them): one line, not an IndexError
    monkeypatch.setattr(r3_rl.data, "_load_dataset", lambda name, split: (
        datasets.Dataset.from_dict({"prompt": []}), None))
    with pytest.raises(UserError, match=r"dataset e \(split 'train'\): no rows"):
        read_hf_prompts("e", "prompt")
    # a binary column (an image's bytes) is no metadata: trajectories are written as JSON
    monkeypatch.setattr(r3_rl.data, "_load_dataset", lambda name, split: (
        datasets.Dataset.from_dict({"prompt": ["a"], "png": [b"\x89PNG"], "n": [3]}), "train"))
    assert [(it.id, it.metadata) for it in read_hf_prompts("e", "prompt")] == [("e:train:0", {"n": 3})]


def test_held_out_subset_of_exactly_len_is_everything_and_smaller_is_sorted() -> None:
    from r3_rl.data import held_out_subset

    items = list(range(30))
    assert held_out_subset(items, 30, 5) == items  # type: ignore[arg-type]
    sub = held_out_subset(items, 7, 5)  # type: ignore[arg-type]
    assert sub == sorted(sub) and len(set(sub)) == 7


def _source(items: list[PromptItem], seed: int) -> object:
    from r3_rl.data import PromptSource

    src = PromptSource.__new__(PromptSource)
    src.recipe = SimpleNamespace(seed=seed, data=SimpleNamespace(source="geneval", eval="e"))
    src.train_items, src.position, src._eval_items = items, 0, None
    return src


def test_each_epoch_of_training_prompts_is_a_fresh_permutation() -> None:
    items = [PromptItem(id=str(i), prompt=str(i)) for i in range(20)]
    src = _source(items, seed=3)
    first, second = src.next_batch(20), src.next_batch(20)  # type: ignore[attr-defined]
    assert sorted(it.id for it in first) == sorted(it.id for it in second) == sorted(it.id for it in items)
    assert [it.id for it in first] != [it.id for it in second]  # reshuffled per epoch (1 in 20! to collide)
    assert src.position == 40  # type: ignore[attr-defined]


def test_eval_prompts_use_the_recipe_seed_and_report_the_pool_size() -> None:
    from r3_rl.data import held_out_subset

    items = [PromptItem(id=str(i), prompt=str(i)) for i in range(40)]
    src = _source(items, seed=11)
    assert src.eval_pool_size() is None  # type: ignore[attr-defined]
    src._eval_items = items  # type: ignore[attr-defined]
    assert src.eval_pool_size() == 40  # type: ignore[attr-defined]
    picked = src.eval_prompts(5)  # type: ignore[attr-defined]
    assert picked == held_out_subset(items, 5, 11)
    # the subset is the seeded draw written out: sorted indices of Random("eval/11").sample
    assert [it.id for it in picked] == [str(i) for i in sorted(random.Random("eval/11").sample(range(40), 5))]


def test_blocks_train_prompt_k_is_the_kth_item_of_the_stream_in_any_order() -> None:
    from r3_rl.blocks.prompts import iter_prompts
    from r3_rl.data import BlocksPrompts

    tags = {"position": 1.0, "counting": 1.0}
    stream = iter_prompts("train", seed=4, tag_mix=tags)
    expected = [next(stream) for _ in range(6)]
    bp = BlocksPrompts(tags, seed=4)
    for k in (2, 3, 0, 5, 5, 1):
        assert bp.train_prompt(k) == expected[k], k


# ------------------------------------------------------------------------------------------------ textfiles.py
def test_a_file_of_exactly_max_bytes_is_read_and_one_more_byte_is_refused(tmp_path: Path) -> None:
    from r3_rl.textfiles import read_utf8, utf8_lines

    p = tmp_path / "r.yaml"
    p.write_bytes(b"ab\ncd\n")  # 6 bytes
    assert read_utf8(p, "recipe", 6) == "ab\ncd\n"
    assert list(utf8_lines(p, "recipe", 6)) == [(1, "ab\n"), (2, "cd\n")]
    with pytest.raises(UserError, match=r"r\.yaml: recipe is 6 bytes, over the limit of 5$"):
        read_utf8(p, "recipe", 5)
    with pytest.raises(UserError, match=r"r\.yaml: recipe is over the limit of 5 bytes$"):
        list(utf8_lines(p, "recipe", 5))


def test_a_missing_file_is_not_found_and_a_folder_is_not_a_regular_file(tmp_path: Path) -> None:
    from r3_rl.textfiles import utf8_lines

    with pytest.raises(UserError, match=r"nope\.jsonl: prompt set not found$"):
        list(utf8_lines(tmp_path / "nope.jsonl", "prompt set"))
    with pytest.raises(UserError, match=r": prompt set is not a regular file$"):
        list(utf8_lines(tmp_path, "prompt set"))


def test_a_gz_over_the_limit_once_decompressed_is_refused_not_cut_short(tmp_path: Path) -> None:
    from r3_rl.textfiles import utf8_lines

    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(b"0123456789\n" * 3))  # 33 bytes decompressed, one long line each
    assert [n for n, _ in utf8_lines(p, "set", 33)] == [1, 2, 3]
    with pytest.raises(UserError, match=r"x\.jsonl\.gz: set is over the limit of 32 bytes once decompressed$"):
        list(utf8_lines(p, "set", 32))
    one = tmp_path / "one.gz"
    one.write_bytes(gzip.compress(b"x" * 50))  # a single line longer than the cap: refused, never truncated
    with pytest.raises(UserError, match=r"over the limit of 10 bytes once decompressed"):
        list(utf8_lines(one, "set", 10))


def test_a_bad_byte_names_line_character_column_and_the_byte(tmp_path: Path) -> None:
    from r3_rl.textfiles import utf8_lines

    p = tmp_path / "f.txt"
    p.write_bytes("ok\n\u00e9\u00e9x\xff\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(UserError, match=r"f\.txt:2: not valid UTF-8 \(byte 0xff at column 4\)"):
        list(utf8_lines(p))


def test_expanded_size_counts_keys_and_values() -> None:
    from r3_rl.textfiles import expanded_size

    assert expanded_size({"a": {"b": 1}}, 100) == 5  # outer mapping, "a", inner mapping, "b", 1
    assert expanded_size({"a": 1, "b": 2}, 100) == 5
    assert expanded_size({"a": 1, "b": 2}, 2) == 3


def test_duplicate_keys_name_the_first_line_and_merge_keys_still_override(tmp_path: Path) -> None:
    import yaml

    from r3_rl.textfiles import read_recipe_yaml, yaml_load_unique

    assert yaml_load_unique("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n") == {
        "base": {"x": 1, "y": 2}, "run": {"x": 3, "y": 2}}
    assert yaml_load_unique("a:\n  <<: [{x: 1}, {y: 2}]\n  <<: {z: 3}\n")["a"] == {"x": 1, "y": 2, "z": 3}
    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'lr', first given on line 2"):
        yaml_load_unique("steps: 1\nlr: 1.0\nseed: 2\nlr: 5.0\n")
    p = tmp_path / "r.yaml"
    p.write_text("steps: 1\nlr: 1.0\nseed: 2\nlr: 5.0\n")
    with pytest.raises(UserError, match=r"r\.yaml:4: not valid YAML \(duplicate key 'lr', first given on line 2\)"):
        read_recipe_yaml(p)


def test_an_empty_mapping_recipe_is_refused_as_empty(tmp_path: Path) -> None:
    from r3_rl.textfiles import read_recipe_yaml

    p = tmp_path / "r.yaml"
    p.write_text("{}\n")
    with pytest.raises(UserError, match=r"r\.yaml: recipe is empty"):
        read_recipe_yaml(p)


# ------------------------------------------------------------------------------------------------ jsonl.py
def test_jsonl_errors_name_the_line_and_the_one_based_column(tmp_path: Path) -> None:
    from r3_rl.jsonl import read_jsonl_objects

    p = tmp_path / "f.jsonl"
    p.write_text('{"a": 1}\n   \n{"a": }\n')
    with pytest.raises(UserError, match=r"f\.jsonl:3: not valid JSON \(Expecting value at column 7\)"):
        list(read_jsonl_objects(p))
    p.write_text('{"a": 1}\n\n"text"\n')
    with pytest.raises(UserError, match=r"f\.jsonl:3: expected a JSON object, got str"):
        list(read_jsonl_objects(p))
    p.write_text('\n{"a": 1}\n \t\n{"b": 2}\n')
    assert list(read_jsonl_objects(p)) == [(2, {"a": 1}), (4, {"b": 2})]


# ------------------------------------------------------------------------------------------------ trajectory.py
def test_tree_paths_leaves_and_the_default_tag() -> None:
    t = _tree(images=(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 3), np.uint8)))
    t.add(Node(id="f0", parent="g0", stage="reflect", round=1, group_id="f", policy_version=0))
    assert [n.id for n in t.path("f0")] == ["r0", "g0", "f0"]
    assert [n.id for n in t.leaves()] == ["g1", "f0"]
    assert [n.id for n in t.children("r0")] == ["g0", "g1"]
    assert PromptItem(id="p", prompt="x").tag == "all"
    seg = Segment("image", {}, [], [-1.0, -2.0, -3.0], action={"steps": 3})
    assert seg.num_actions == 3


def test_context_png_refs_replace_only_single_key_dicts_and_reach_mixed_lists(tmp_path: Path) -> None:
    b64 = _png_b64(9)
    ctx = {"input_ids": [1, 2], "other": {"png": "not-an-image", "note": 1}, "mixed": [5, {"png": b64}]}
    p = write_trees([_tree(context=ctx, meta={"k": 1})], tmp_path / "d.jsonl")
    raw = json.loads(p.read_text())
    written = raw["nodes"][0]["segment"]["context"]
    assert written["other"] == {"png": "not-an-image", "note": 1}  # not a lone {"png": ...}: kept as it is
    assert written["mixed"][0] == 5 and set(written["mixed"][1]) == {"png_file"}
    assert raw["meta"] == {"k": 1}
    (back,) = read_trees(p)
    assert back.nodes["r0"].segment.context == ctx and back.meta == {"k": 1}


def test_equal_images_share_one_png_and_numpy_scalars_are_written(tmp_path: Path) -> None:
    img = np.full((2, 2, 3), 5, np.uint8)
    t = _tree(images=(img, img.copy()))
    t.nodes["g0"].rewards = {"r": np.float32(0.5)}  # type: ignore[dict-item]
    p = write_trees([t], tmp_path / "d.jsonl")
    nodes = json.loads(p.read_text())["nodes"]
    assert nodes[1]["image"] == nodes[2]["image"] == "d_images/t0/g0.png"
    assert sorted(f.name for f in (tmp_path / "d_images" / "t0").iterdir()) == ["g0.png"]
    assert nodes[1]["rewards"] == {"r": 0.5}


def test_an_absolute_image_path_is_refused_even_inside_the_dump_folder(tmp_path: Path) -> None:
    p = write_trees([_tree(images=(np.zeros((2, 2, 3), np.uint8),))], tmp_path / "d.jsonl")
    raw = json.loads(p.read_text())
    raw["nodes"][1]["image"] = str(tmp_path / raw["nodes"][1]["image"])
    p.write_text(json.dumps(raw) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:1: not a trajectory tree .*outside the dump's folder"):
        list(read_trees(p))


def test_an_rgba_png_in_a_dump_reads_back_as_rgb(tmp_path: Path) -> None:
    from PIL import Image

    p = write_trees([_tree(images=(np.zeros((2, 2, 3), np.uint8),))], tmp_path / "d.jsonl")
    Image.fromarray(np.full((2, 2, 4), 200, np.uint8)).save(tmp_path / "d_images" / "t0" / "g0.png")
    (back,) = read_trees(p)
    assert back.nodes["g0"].image.shape == (2, 2, 3) and int(back.nodes["g0"].image[0, 0, 0]) == 200


def test_image_caps_are_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import trajectory

    b64 = _png_b64(3)
    p = write_trees([_tree(context={"in": {"png": b64}}, images=(np.zeros((2, 2, 3), np.uint8),))],
                    tmp_path / "d.jsonl")
    monkeypatch.setattr(trajectory, "MAX_CONTEXT_PNG_BYTES", len(base64.b64decode(b64)))
    monkeypatch.setattr(trajectory, "MAX_IMAGE_PIXELS", 4)
    (back,) = read_trees(p)  # a 2x2 image and a context PNG of exactly the caps are read
    assert back.nodes["r0"].segment.context == {"in": {"png": b64}} and back.nodes["g0"].image.shape == (2, 2, 3)
    monkeypatch.setattr(trajectory, "MAX_IMAGE_PIXELS", 3)
    with pytest.raises(UserError, match=r"is 2x2 pixels, over 3"):
        list(read_trees(p))


def test_a_node_field_of_the_wrong_json_type_is_a_one_line_error(tmp_path: Path) -> None:
    p = write_trees([_tree()], tmp_path / "d.jsonl")
    raw = json.loads(p.read_text())
    raw["nodes"][0]["segment"] = {**raw["nodes"][0]["segment"], "sampling": None}
    p.write_text("\n" + json.dumps(raw) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:2: not a trajectory tree r3-rl can read \(TypeError"):
        list(read_trees(p))
    raw = json.loads(write_trees([_tree()], tmp_path / "e.jsonl").read_text())
    raw["prompt"] = "just a string"
    (tmp_path / "e.jsonl").write_text(json.dumps(raw) + "\n")
    with pytest.raises(UserError, match=r"e\.jsonl:1: not a trajectory tree r3-rl can read"):
        list(read_trees(tmp_path / "e.jsonl"))


# ------------------------------------------------------------------------------------------------ weights.py
def _safetensors(path: Path, header: dict, data: int) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


def test_safetensors_params_skips_metadata_and_checks_the_data_end(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.weights import WeightsMissing, safetensors_params

    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
    assert safetensors_params(_safetensors(tmp_path / "m.safetensors", header, 40)) == 10
    with pytest.raises(WeightsMissing, match=r"not a complete safetensors file \(.* bytes, the header names"):
        safetensors_params(_safetensors(tmp_path / "m.safetensors", header, 39))
    raw = json.dumps(header).encode()
    from r3_rl import weights

    monkeypatch.setattr(weights, "SAFETENSORS_MAX_HEADER", len(raw))  # a header of exactly the cap is read
    assert safetensors_params(_safetensors(tmp_path / "m.safetensors", header, 40)) == 10
    monkeypatch.setattr(weights, "SAFETENSORS_MAX_HEADER", len(raw) - 1)
    with pytest.raises(WeightsMissing, match=rf"a header length of {len(raw)} bytes, over {len(raw) - 1}"):
        safetensors_params(tmp_path / "m.safetensors")
    monkeypatch.undo()
    (tmp_path / "cut.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw[:-3])
    with pytest.raises(WeightsMissing, match=r"the header is cut at"):
        safetensors_params(tmp_path / "cut.safetensors")


def test_repo_ids_and_folders(tmp_path: Path) -> None:
    from r3_rl.weights import WeightsMissing, _looks_like_repo_id, locate

    assert _looks_like_repo_id("org/model") and not _looks_like_repo_id("a/b/c") and not _looks_like_repo_id("a/")
    assert locate(str(tmp_path)) == tmp_path
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(WeightsMissing, match=r"no such folder"):
        locate(str(f))
    with pytest.raises(WeightsMissing, match=r"'a/b/c': no such folder"):
        locate("a/b/c")



def test_a_local_folder_named_like_a_hub_id_is_used_without_the_cache(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.weights import locate

    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert locate("org/model", cache_dir=tmp_path / "no-cache") == Path("org/model")


def test_weight_files_dedupes_shards_and_prefers_safetensors(tmp_path: Path) -> None:
    from r3_rl.weights import WeightsMissing, weight_files

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "x.bin").write_bytes(b"")
    (tmp_path / "y.safetensors").write_bytes(b"")
    (tmp_path / "dir.safetensors").mkdir()
    assert [f.name for f in weight_files(tmp_path)] == ["y.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "y.safetensors",
                                                                                     "b": "y.safetensors"}}))
    assert [f.name for f in weight_files(tmp_path)] == ["y.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(WeightsMissing, match=r"not a readable shard index"):
        weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "y.safetensors", "b": "z1.safetensors", "c": "z2.safetensors"}}))
    with pytest.raises(WeightsMissing, match=r"lacks 2 of 3 weight shards \(z1\.safetensors"):
        weight_files(tmp_path)


def test_count_params_and_image_side_defaults(tmp_path: Path) -> None:
    from r3_rl.weights import count_params, image_side

    b = tmp_path / "pytorch_model.bin"
    b.write_bytes(b"\0" * 1000)
    assert count_params([b], {"torch_dtype": "bfloat16"}) == 500
    assert image_side({}) == 384  # 24 patches x 2^4
    assert image_side({"vq_config": {"num_patches": 16, "channel_multiplier": [1, 2, 4]}}) == 64


def _recipe(**learner: object) -> SimpleNamespace:
    base = dict(lora=None, backend="torch", deepspeed=SimpleNamespace(dtype=None), algorithm="grpo",
                ppo=SimpleNamespace(critic="shared"), kl_coef_text=0.0, kl_coef_image=0.0)
    base.update(learner)
    return SimpleNamespace(learner=SimpleNamespace(**base), policy=SimpleNamespace(dtype="bf16", kind="janus"),
                           data=SimpleNamespace(blocks=SimpleNamespace(rows=3, cols=4)),
                           tree=SimpleNamespace(buffer_size=10))


def test_checkpoint_bytes_by_part() -> None:
    from r3_rl.weights import checkpoint_bytes

    # bf16: 2 bytes a weight; AdamW 8 + fp32 masters 4; 384^2 px / 16^2 = 576 tokens of 4 bytes + 512 per entry
    buffer = 2 * 10 * (4 * 576 + 512)
    assert checkpoint_bytes(_recipe(), 100, 384 * 384) == {
        "model": 200, "reference": 0, "optimiser": 1200, "parent buffer": buffer}
    assert checkpoint_bytes(_recipe(kl_coef_text=0.1, algorithm="ppo", ppo=SimpleNamespace(critic="separate")),
                            100, 384 * 384) == {"model": 200, "reference": 200, "optimiser": 1200, "critic": 1400,
                                                "parent buffer": buffer}
    ds = checkpoint_bytes(_recipe(backend="deepspeed", deepspeed=SimpleNamespace(dtype="float32")), 100, 0)
    assert ds == {"model": 200, "reference": 0, "optimiser": 800, "DeepSpeed module": 200,
                  "parent buffer": 2 * 10 * 512}
    lora = checkpoint_bytes(_recipe(backend="deepspeed", lora=object(), kl_coef_text=1.0), 100, 0)
    assert lora == {"model": 200, "reference": 0, "optimiser": 0, "parent buffer": 2 * 10 * 512}
    tiny = _recipe()
    tiny.policy.kind, tiny.policy.dtype = "tiny", "fp32"
    assert checkpoint_bytes(tiny, 10, 999) == {"model": 40, "reference": 0, "optimiser": 80,
                                               "parent buffer": 2 * 10 * (4 * 12 + 512)}


def test_an_epoch_of_training_prompts_costs_one_shuffle_in_the_seeded_order(monkeypatch: pytest.MonkeyPatch
                                                                           ) -> None:
    """The order of epoch e is ``random.Random(f"{seed}/{e}")``'s shuffle of the item indices, shuffled once per
    epoch: until session 54 every prompt shuffled the whole list again (a 200k-prompt set took 3 s per 64-prompt
    batch), and a source resumed mid-epoch must still hand out that epoch's order."""
    items = [PromptItem(id=str(i), prompt=str(i)) for i in range(7)]
    expected = []
    for epoch in range(3):
        order = list(range(7))
        random.Random(f"5/{epoch}").shuffle(order)
        expected += [str(i) for i in order]
    shuffles = []
    real_shuffle = random.Random.shuffle
    monkeypatch.setattr(random.Random, "shuffle", lambda self, x: (shuffles.append(len(x)), real_shuffle(self, x)))
    src = _source(items, seed=5)
    assert [it.id for it in src.next_batch(21)] == expected  # type: ignore[attr-defined]
    assert shuffles == [7, 7, 7]
    resumed = _source(items, seed=5)
    resumed.position = 10  # type: ignore[attr-defined]
    assert [it.id for it in resumed.next_batch(11)] == expected[10:]  # type: ignore[attr-defined]
