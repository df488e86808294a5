"""Exact, small checks on prompt data, prompt-set names, trajectory dumps, plug-in files, user files, run dirs and
weights (each pins one behaviour a one-point bug would change without any other test noticing)."""
from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.trajectory import Node, PromptItem, Segment, Tree, read_trees, write_trees

REPO = Path(__file__).resolve().parents[1]
GENEVAL = {"prompt": "a red square", "tag": "colors", "include": [{"class": "square", "count": 1}]}


def _png_b64(shape: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 7, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tree(tree_id: str = "t0", images: tuple[np.ndarray, ...] = (), context: dict | None = None) -> Tree:
    t = Tree(id=tree_id, prompt=PromptItem(id="p", prompt="a red square"))
    seg = Segment("text", context or {"input_ids": [1, 2]}, [3], [-0.5])
    t.add(Node(id="r0", parent=None, stage="reason", round=0, group_id="g", policy_version=0, segment=seg, text="x"))
    for i, img in enumerate(images):
        t.add(Node(id=f"g{i}", parent="r0", stage="generate", round=0, group_id="g/i", policy_version=0, image=img))
    return t


def _error_reading(read: Callable[[], Any], fifo: Path) -> BaseException | None:
    """What ``read()`` raised (None if nothing), run in a thread: a read that blocks on ``fifo`` (opening a FIFO
    waits for a writer) is released with one, and the test fails."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the thread reports whatever happened
            outcome.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(10)
    if th.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        th.join(10)
        pytest.fail(f"reading {fifo.name} blocked on a FIFO instead of refusing it")
    return outcome[0]


# ------------------------------------------------------------------------------------------------ data.py
def test_hf_eval_without_data_eval_is_the_eval_split_not_the_training_one(tmp_path: Path) -> None:
    """With ``data.source: hf`` and no ``data.eval`` the held-out prompts are ``data.eval_split`` of
    ``data.train``: evaluating on the training split would overstate accuracy."""
    import datasets

    from r3_rl.data import PromptSource

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a cat", "a dog"]}),
                          "test": datasets.Dataset.from_dict({"text": ["a cow"]})}).save_to_disk(str(tmp_path / "dd"))
    data = SimpleNamespace(source="hf", train=str(tmp_path / "dd"), eval=None, prompt_column="text",
                           train_split="train", eval_split="test")
    src = PromptSource(SimpleNamespace(seed=0, data=data))
    assert [p.prompt for p in src.eval_prompts(10)] == ["a cow"]
    assert sorted(p.prompt for p in src.next_batch(2)) == ["a cat", "a dog"]


# ------------------------------------------------------------------------------------------------ prompt_sets
def test_a_file_named_like_a_builtin_set_is_read_as_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from r3_rl.data import load_prompts
    from r3_rl.prompt_sets import lookup

    monkeypatch.chdir(tmp_path)
    Path("geneval:mine.jsonl").write_text(json.dumps(GENEVAL) + "\n")
    assert lookup("geneval:mine.jsonl") is None
    assert [p.prompt for p in load_prompts("geneval", "geneval:mine.jsonl")] == ["a red square"]
    with pytest.raises(ValueError, match="unknown built-in prompt set 'geneval:other'"):
        lookup("geneval:other")


# ------------------------------------------------------------------------------------------------ trajectory.py
def test_equal_bytes_of_different_shapes_are_two_images(tmp_path: Path) -> None:
    """Images are shared within a dump by content: two all-zero images of different shapes have the same bytes
    but are not the same image."""
    a, b = np.zeros((2, 6, 3), np.uint8), np.zeros((4, 3, 3), np.uint8)
    path = write_trees([_tree(images=(a, b))], tmp_path / "d.jsonl")
    back = next(read_trees(path))
    assert back.nodes["g0"].image.shape == (2, 6, 3) and back.nodes["g1"].image.shape == (4, 3, 3)


def test_a_context_image_over_the_cap_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import trajectory

    b64 = _png_b64((8, 8, 3))
    path = write_trees([_tree(context={"input": {"png": b64}, "ids": [1]})], tmp_path / "d.jsonl")
    assert next(read_trees(path)).nodes["r0"].segment.context == {"input": {"png": b64}, "ids": [1]}
    monkeypatch.setattr(trajectory, "MAX_CONTEXT_PNG_BYTES", len(base64.b64decode(b64)) - 1)
    with pytest.raises(UserError, match=r"d\.jsonl:1: not a trajectory tree .*MiB"):
        next(read_trees(path))


def test_a_failed_rewrite_leaves_the_previous_dump_whole(tmp_path: Path) -> None:
    path = write_trees([_tree("old")], tmp_path / "d.jsonl")

    def trees():
        yield _tree("new")
        raise RuntimeError("rollout died")

    with pytest.raises(RuntimeError, match="rollout died"):
        write_trees(trees(), path)
    assert [t.id for t in read_trees(path)] == ["old"]


def test_tree_ids_cannot_place_images_outside_the_dump_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    path = write_trees([_tree("../../escape", images=(np.zeros((2, 2, 3), np.uint8),))], out / "d.jsonl")
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert pngs == ["a/b/d_images/.._.._escape/g0.png"]
    assert next(read_trees(path)).nodes["g0"].image.shape == (2, 2, 3)


# ------------------------------------------------------------------------------------------------ plugins.py
def test_a_plugin_file_that_exits_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    from r3_rl.plugins import import_attr

    f = tmp_path / "exits_plugin.py"
    f.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(UserError) as e:
        import_attr(f"{f}:fn", "reward 'x'", "fn")
    assert f"importing {f} failed: SystemExit: 3" in str(e.value)


def test_a_plugin_file_is_imported_once(tmp_path: Path) -> None:
    from r3_rl.plugins import import_attr

    f = tmp_path / "once_plugin.py"
    f.write_text("import builtins\nbuiltins._r3_once_count = getattr(builtins, '_r3_once_count', 0) + 1\n"
                 "def fn(x):\n    return x\n")
    import builtins

    try:
        assert import_attr(f"{f}:fn", "reward", "fn") is import_attr(f"{f}:fn", "policy", "fn")
        assert builtins._r3_once_count == 1  # type: ignore[attr-defined]
    finally:
        builtins.__dict__.pop("_r3_once_count", None)


def test_a_plugin_file_in_the_working_directory_needs_no_slash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from r3_rl.plugins import import_attr

    monkeypatch.chdir(tmp_path)
    Path("cwd_plugin_r3.py").write_text("def fn():\n    return 42\n")
    assert import_attr("cwd_plugin_r3.py:fn", "reward", "fn")() == 42


# ------------------------------------------------------------------------------------------------ jsonl / textfiles
def test_a_truncated_gzip_prompt_file_is_a_one_line_error(tmp_path: Path) -> None:
    from r3_rl.jsonl import read_jsonl_objects

    whole = gzip.compress(("\n".join(json.dumps(dict(GENEVAL, prompt=f"p{i}")) for i in range(50)) + "\n").encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(whole[:-12])  # an interrupted download: no end-of-stream marker
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: not a valid gzip file"):
        list(read_jsonl_objects(p))


def test_an_oversized_recipe_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from r3_rl.textfiles import MAX_RECIPE_BYTES, read_recipe_yaml, read_utf8

    p = tmp_path / "big.yaml"
    p.write_text("name: big\n" + "#" * (MAX_RECIPE_BYTES - 10) + "\n")  # 1 byte over: a comment, valid YAML
    with pytest.raises(UserError, match=rf"big\.yaml: recipe is {MAX_RECIPE_BYTES + 1} bytes, over the limit of "
                                        rf"{MAX_RECIPE_BYTES}"):
        read_recipe_yaml(p)
    small = tmp_path / "s.txt"
    small.write_text("0123456789")
    assert read_utf8(small, max_bytes=10) == "0123456789"
    with pytest.raises(UserError, match="s.txt: file is 10 bytes, over the limit of 9"):
        read_utf8(small, max_bytes=9)


def test_a_fifo_or_folder_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    from r3_rl.jsonl import read_jsonl_objects
    from r3_rl.textfiles import open_regular

    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(UserError, match=r"dir\.jsonl: prompt set is not a regular file"):
        open_regular(tmp_path / "dir.jsonl", "prompt set")
    if not hasattr(os, "mkfifo"):
        return
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    err = _error_reading(lambda: list(read_jsonl_objects(fifo)), fifo)
    assert isinstance(err, UserError) and "is not a regular file" in str(err)


# ------------------------------------------------------------------------------------------------ run_dir.py
def test_a_run_dir_holding_a_linked_folder_is_refused(tmp_path: Path) -> None:
    from r3_rl.config import load_recipe
    from r3_rl.run_dir import make_run_dir

    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", [f"out_dir={tmp_path}"])
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "trajectories").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="trajectories is a symbolic link"):
        make_run_dir(recipe, str(run))
    assert not (run / "recipe.yaml").exists()


# ------------------------------------------------------------------------------------------------ weights.py
def test_a_sharded_index_naming_a_missing_shard_is_weights_missing(tmp_path: Path) -> None:
    from r3_rl.weights import WeightsMissing, weight_files

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    (tmp_path / "model-1.safetensors").write_bytes(b"")
    with pytest.raises(WeightsMissing, match=r"lacks 1 of 2 weight shards \(model-2\.safetensors"):
        weight_files(tmp_path)
    (tmp_path / "model-2.safetensors").write_bytes(b"")
    assert [f.name for f in weight_files(tmp_path)] == ["model-1.safetensors", "model-2.safetensors"]


@pytest.mark.parametrize("steps, save_every, keep_last, expected", [
    (7, 5, 3, 2),  # step 5, then the final step 7 beside it
    (1, 5, 3, 1),  # only the final one
    (11, 5, 3, 3),  # steps 5 and 10, then 11
])
def test_checkpoints_on_disk_when_steps_is_not_a_multiple_of_save_every(steps, save_every, keep_last, expected
                                                                       ) -> None:
    from r3_rl.weights import checkpoints_on_disk

    recipe = SimpleNamespace(steps=steps, save_every=save_every, keep_last=keep_last)
    assert checkpoints_on_disk(recipe) == expected


def test_a_bin_without_torch_dtype_counts_float32_parameters(tmp_path: Path) -> None:
    from r3_rl.weights import count_params

    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"\0" * 1000)
    assert count_params([weights], {}) == 250


# ------------------------------------------------------------------------------------------------ read_trees on a shared dump
def test_a_node_that_is_not_an_object_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_trees([_tree()], tmp_path / "d.jsonl")
    d = json.loads(path.read_text())
    for nodes, said in ((["x"], "node 0 is str, not an object"), ({"a": 1}, "'nodes' is dict, not a list")):
        path.write_text(json.dumps({**d, "nodes": nodes}) + "\n")
        with pytest.raises(UserError, match=rf"d\.jsonl:1: not a trajectory tree r3-rl can read \(TypeError: {said}"):
            next(read_trees(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX feature")
@pytest.mark.parametrize("where", ["image", "context"])
def test_a_fifo_in_a_dumps_image_folder_is_refused_not_waited_on(tmp_path: Path, where: str) -> None:
    """A dump is a file people share: a FIFO where a node's image (or a context's input PNG) should be would
    block ``r3-rl inspect`` forever; it is a one-line ``file:line`` error instead."""
    b64 = _png_b64((4, 4, 3))
    if where == "image":
        path = write_trees([_tree(images=(np.zeros((2, 2, 3), np.uint8),))], tmp_path / "d.jsonl")
        target = tmp_path / "d_images" / "t0" / "g0.png"
    else:
        path = write_trees([_tree(context={"input": {"png": b64}, "ids": [1]})], tmp_path / "d.jsonl")
        [target] = (tmp_path / "d_images" / "t0").glob("input_*.png")
    assert len(list(read_trees(path))) == 1
    target.unlink()
    os.mkfifo(target)
    err = _error_reading(lambda: list(read_trees(path)), target)
    assert isinstance(err, UserError), err
    assert re.search(r"d\.jsonl:1: not a trajectory tree r3-rl can read \(ValueError: image path .* is not a regular "
                     r"file\)", str(err)), str(err)


# ------------------------------------------------------------------------------------------------ a user's reference set
def _png_file(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)


def test_a_users_reference_set_reads_back_exactly(tmp_path: Path) -> None:
    """``eval.understanding.reference: FILE``: each line's PNG (relative to the file), its kind, and its metadata
    (the ``metadata`` field, else the line's other keys, as in GenEval files)."""
    from r3_rl.eval.understanding import load_references

    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "imgs").mkdir()
    _png_file(tmp_path / "imgs" / "a.png", a)
    _png_file(tmp_path / "b.png", np.full((4, 4, 3), 9, np.uint8))
    ref = tmp_path / "refs.jsonl"
    ref.write_text(json.dumps({"prompt": "a red square", "image": "imgs/a.png", "kind": "correct", "tag": "colors",
                               "include": [{"class": "square", "count": 1}]}) + "\n"
                   + json.dumps({"prompt": "two circles", "image": "b.png", "metadata": {"tag": "counting"},
                                 "ignored": 1}) + "\n")
    first, second = load_references(str(ref))
    assert np.array_equal(first.image, a) and first.kind == "correct" and first.image_tokens is None
    assert first.prompt.id == "ref-1" and first.prompt.prompt == "a red square"
    assert first.prompt.metadata == {"tag": "colors", "include": [{"class": "square", "count": 1}]}
    assert second.kind == "unknown" and second.prompt.metadata == {"tag": "counting"} and second.image.shape == (4, 4, 3)


def test_a_users_reference_set_names_the_line_of_a_bad_image(tmp_path: Path) -> None:
    from r3_rl.eval.understanding import load_references

    ref = tmp_path / "refs.jsonl"
    ref.write_text(json.dumps({"prompt": "p", "image": "missing.png"}) + "\n")
    with pytest.raises(UserError, match=r"refs\.jsonl:1: cannot read image .*missing\.png"):
        load_references(str(ref))
    ref.write_text(json.dumps({"prompt": "p", "image": 3}) + "\n")
    with pytest.raises(UserError, match=r"refs\.jsonl:1: needs string fields 'prompt' and 'image'"):
        load_references(str(ref))
    if not hasattr(os, "mkfifo"):
        return
    os.mkfifo(tmp_path / "pipe.png")
    ref.write_text(json.dumps({"prompt": "p", "image": "pipe.png"}) + "\n")
    err = _error_reading(lambda: load_references(str(ref)), tmp_path / "pipe.png")
    assert isinstance(err, UserError) and re.search(r"refs\.jsonl:1: cannot read image .*pipe\.png: .*not a regular "
                                                    r"file", str(err)), err
