"""Trajectory trees round-trip through JSONL + PNG without loss."""
from __future__ import annotations

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.policy.base import parse_critique
from r3_rl.trajectory import Node, PromptItem, SamplingParams, Segment, Tree, read_trees, write_trees


def _tree(rng: np.random.Generator) -> Tree:
    t = Tree(id="s0-A0", prompt=PromptItem(id="p1", prompt="a photo of two red squares",
                                           metadata={"tag": "counting", "include": [{"class": "square", "count": 2}],
                                                     "exclude": [{"class": "square", "count": 3}]}))
    seg = Segment("text", {"input_ids": [2, 5, 7]}, [9, 10, 4], [-0.1234567890123, -2.5e-9, -7.0],
                  SamplingParams(temperature=0.9, top_p=0.9, top_k=5, cfg_scale=1.0, max_new_tokens=16))
    t.add(Node(id="p0", parent=None, stage="reason", round=0, group_id="g/plan", policy_version=3, segment=seg,
               text="<think> two red square </think>", reward=0.55, advantage=-0.125, rewards={"format": 1.0}))
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    iseg = Segment("image", {"input_ids": [1], "uncond_ids": [2]}, list(range(16)), [float(-i) / 3 for i in range(16)],
                   SamplingParams(cfg_scale=3.0))
    t.add(Node(id="g0", parent="p0", stage="generate", round=0, group_id="g/image", policy_version=3, segment=iseg,
               image=img, image_tokens=list(range(16)), reward=None, reward_failures={"blocks": "boom"},
               meta={"correct": None}))
    t.add(Node(id="c1", parent="g0", stage="reflect", round=1, group_id="g/reflect", policy_version=4, stop=True,
               text="<think> ok </think> no further edit needed", edit_instruction="no further edit needed"))
    return t


def test_jsonl_png_round_trip_is_lossless(tmp_path) -> None:
    rng = np.random.default_rng(0)
    trees = [_tree(rng), _tree(rng)]
    trees[1].id = "s0-A1"
    path = write_trees(trees, tmp_path / "trajectories" / "step_000001.jsonl")
    back = list(read_trees(path))
    assert [t.id for t in back] == [t.id for t in trees]
    for a, b in zip(trees, back):
        assert a.prompt == b.prompt and a.meta == b.meta
        assert list(a.nodes) == list(b.nodes)
        for na, nb in zip(a.nodes.values(), b.nodes.values()):
            for field in ("id", "parent", "stage", "round", "group_id", "policy_version", "segment", "text", "stop",
                          "edit_instruction", "rewards", "reward_failures", "reward", "advantage", "meta",
                          "image_tokens"):
                assert getattr(na, field) == getattr(nb, field), field
            if na.image is None:
                assert nb.image is None
            else:
                assert nb.image.dtype == np.uint8 and np.array_equal(na.image, nb.image)


def test_tree_rejects_unknown_parent_and_duplicates() -> None:
    t = _tree(np.random.default_rng(1))
    with pytest.raises(ValueError):
        t.add(Node(id="x", parent="nope", stage="refine", round=1, group_id="g", policy_version=0))
    with pytest.raises(ValueError):
        t.add(Node(id="p0", parent=None, stage="reason", round=0, group_id="g", policy_version=0))
    assert [n.id for n in t.path("c1")] == ["p0", "g0", "c1"]


def test_malformed_jsonl_names_file_and_line(tmp_path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "prompt": {"id": "1", "prompt": "x"}, "nodes": []}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        list(read_trees(p))


@pytest.mark.parametrize("text,instruction,stop", [
    ("<think> looks fine </think> no further edit needed", "no further edit needed", True),
    ("<think> one is missing </think> add a red square", "add a red square", False),
    ("no closing tag at all", "no further edit needed", True),  # reference rule: missing </think> => stop
    ("<think> a </think> b </think> No Further Edit Needed.", "No Further Edit Needed.", True),
])
def test_parse_critique(text: str, instruction: str, stop: bool) -> None:
    assert parse_critique(text) == (instruction, stop)


def test_continuous_actions_round_trip_and_files_from_before_them_still_read(tmp_path) -> None:
    """``Segment.action`` (a continuous action's record) is written and read back; a JSONL tree written before
    that field existed reads the same (no ``action``: a token segment); a line this version cannot read is one
    ``file:line`` error."""
    import json

    t = _tree(np.random.default_rng(2))
    flow = Segment("image", {"prompt": 3}, [], [-1.5, -0.25], SamplingParams(), action={"z": [0.5, -1.25]})
    t.add(Node(id="g1", parent="p0", stage="generate", round=0, group_id="g/image", policy_version=3,
               segment=flow, image=np.zeros((4, 4, 3), np.uint8)))
    path = write_trees([t], tmp_path / "new.jsonl")
    back = next(read_trees(path))
    assert back.nodes["g1"].segment == flow and back.nodes["g1"].segment.num_actions == 2
    assert back.nodes["p0"].segment.action is None and back.nodes["p0"].segment.num_actions == 3

    old = json.loads(path.read_text())
    for node in old["nodes"]:
        if node["segment"] is not None and node["segment"]["action"] is None:
            del node["segment"]["action"]  # the layout of files written before Segment.action
    old["nodes"] = [n for n in old["nodes"] if n["id"] != "g1"]
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    assert "action" not in (tmp_path / "old.jsonl").read_text()
    again = next(read_trees(tmp_path / "old.jsonl"))
    assert again.nodes["p0"].segment == t.nodes["p0"].segment

    old["nodes"][0]["segment"]["denoise_steps"] = 3  # from a newer version: refused, in one line
    (tmp_path / "newer.jsonl").write_text("\n" + json.dumps(old) + "\n")
    with pytest.raises(UserError, match=r"newer.jsonl:2: not a trajectory tree r3-rl can read \(TypeError"):
        next(read_trees(tmp_path / "newer.jsonl"))
