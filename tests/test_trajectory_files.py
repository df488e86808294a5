"""Dumps and logs as files people keep, share and damage: a trajectory dump from someone else reads nothing outside
its folder and no image bomb, a damaged one is one line; metrics.jsonl survives a run killed mid-write; a real-size
image shrinks into a TensorBoard cell without aliasing; a long critique's instruction shows in `r3-rl inspect`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.inspect import trajectory_text
from r3_rl.tracking.logger import MetricsLogger
from r3_rl.tracking.tensorboard import fit_cell
from r3_rl.trajectory import Node, PromptItem, Tree, read_trees, write_trees


def _dump(folder: Path) -> Path:
    t = Tree("t0", PromptItem("p0", "a photo of a cat"))
    t.add(Node("plan", None, "reason", 0, "g", 0, text="<think>a cat</think>"))
    t.add(Node("img0", "plan", "generate", 0, "g", 0, image=np.full((24, 24, 3), 90, np.uint8)))
    return write_trees([t], folder / "trajectories" / "step_000000.jsonl")


def _point_image_at(dump: Path, path: str) -> None:
    d = json.loads(dump.read_text().splitlines()[0])
    d["nodes"][1]["image"] = path
    dump.write_text(json.dumps(d) + "\n")


def test_a_dump_reads_no_image_outside_its_folder(tmp_path: Path) -> None:
    dump = _dump(tmp_path / "run")
    assert read_trees(dump).__next__().nodes["img0"].image.mean() == 90
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "private.png")
    for path in (str(tmp_path / "private.png"), "../../private.png"):
        _point_image_at(dump, path)
        with pytest.raises(UserError, match=r"step_000000.jsonl:1: .*outside the dump's folder"):
            list(read_trees(dump))


def test_a_damaged_dump_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    dump = _dump(tmp_path / "run")
    shutil.rmtree(dump.parent / "step_000000_images")  # deleted to free disk
    with pytest.raises(UserError, match=r"step_000000.jsonl:1: not a trajectory tree .*FileNotFoundError"):
        list(read_trees(dump))
    dump = _dump(tmp_path / "again")
    rel = json.loads(dump.read_text().splitlines()[0])["nodes"][1]["image"]
    (dump.parent / rel).write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"step_000000.jsonl:1: .*UnidentifiedImageError"):
        list(read_trees(dump))
    Image.new("1", (5000, 5000)).save(dump.parent / rel)  # 25 Mpx in a few kB
    with pytest.raises(UserError, match=r"5000x5000 pixels, over"):
        list(read_trees(dump))


def test_metrics_jsonl_stays_readable_after_a_run_killed_mid_write(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"1_reward/generate": 0.5}, 0)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "1_rew')  # killed mid-write
    logger = MetricsLogger(tmp_path, tensorboard=False)  # the run dir used again
    logger.log({"1_reward/generate": 0.7}, 1)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["1_reward/generate"]) for r in rows] == [(0, 0.5), (1, 0.7)]


def test_a_resume_keeps_the_synergy_figures_of_a_kept_eval(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"1_reward/generate": 0.5}, 4)
    logger.log({"eval/accuracy/round0": 0.3}, 5)  # the eval at the checkpoint's step, written
    logger.log({"0_eval/synergy/first_image_gain": 0.1}, 5)  # its figures against the eval before RL
    logger.log({"1_reward/generate": 0.6}, 5)  # the step after the checkpoint: replayed
    logger.rewind(5, keep_evals=True)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["1_reward/generate", "step"], ["eval/accuracy/round0", "step"],
                                         ["0_eval/synergy/first_image_gain", "step"]]


def test_a_real_size_image_shrinks_into_its_cell_without_aliasing() -> None:
    stripes = np.zeros((384, 384, 3), np.uint8)
    stripes[:, 1::3] = 255  # a third of the pixels white: nearest-neighbour kept only the white ones
    cell = fit_cell(stripes)
    assert cell.shape == (128, 128, 3) and abs(float(cell.mean()) - float(stripes.mean())) < 2
    blocks = np.arange(16 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5  # a 4x4 Blocks image keeps its hard cells
    assert np.array_equal(fit_cell(blocks)[::32, ::32], blocks)


def test_inspect_shows_the_instruction_of_a_long_critique() -> None:
    t = Tree("t", PromptItem("p", "a red cat"))
    t.add(Node("c", None, "reflect", 1, "g", 0, text="<think>" + "the cat looks fine " * 40 + "</think> Make the cat red.",
               edit_instruction="Make the cat red.", stop=False))
    assert "-> Make the cat red." in trajectory_text(t, [t.nodes["c"]])


def test_an_image_already_in_the_dump_is_not_written_again(tmp_path: Path) -> None:
    """A "no further edit" copy of its parent points at the parent's PNG (a third of the images at a 0.375 stop
    rate, each 220 KB and 65 ms at 384 px); distinct images keep their own files and read back exactly."""
    rng = np.random.default_rng(0)
    root = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    trees = []
    for i in range(2):
        t = Tree(f"t{i}", PromptItem(f"p{i}", "a photo of a cat"))
        t.add(Node("img0", None, "generate", 0, "g", 0, image=root))
        t.add(Node("crit1", "img0", "reflect", 1, "g", 0, text="no further edit needed", stop=True))
        t.add(Node("img1", "crit1", "refine", 1, "g", 0, image=root.copy()))  # the stop's copy
        t.add(Node("img2", "crit1", "refine", 1, "g", 0, image=root[::-1].copy()))  # a real edit
        trees.append(t)
    dump = write_trees(trees, tmp_path / "step_000000.jsonl")
    assert len(list((tmp_path / "step_000000_images").rglob("*.png"))) == 2
    for t, back in zip(trees, read_trees(dump)):
        for nid in ("img0", "img1", "img2"):
            assert np.array_equal(back.nodes[nid].image, t.nodes[nid].image), nid


def test_an_input_image_every_critique_repeats_is_written_once_and_read_back_exactly(tmp_path: Path) -> None:
    """A BAGEL critique or edit keeps its input image in its context as base64 PNG, so every sibling repeats its
    parent's (half of a BAGEL dump's JSONL).  The dump writes each such PNG once, as its bytes, points the
    contexts at it, and reads the contexts back bit for bit; the tree in memory is left as it was; a context path
    out of the dump's folder is refused."""
    from r3_rl.policy.bagel.contexts import store_images
    from r3_rl.trajectory import Segment

    rng = np.random.default_rng(0)
    parent = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    images = store_images([parent])
    t = Tree("t0", PromptItem("p0", "a photo of a cat"))
    t.add(Node("img0", None, "generate", 0, "g", 0, image=parent))
    for k in range(4):
        context = {"blocks": [{"text": [1, 2, 3]}, {"vit": 0}], "images": images}
        t.add(Node(f"crit{k}", "img0", "reflect", 1, "g", 0, text="add a dog",
                   segment=Segment("text", context, [4, 5], [-1.0, -2.0])))
    dump = write_trees([t], tmp_path / "step_000000.jsonl")
    text = dump.read_text()
    assert images["0"]["png"] not in text and text.count('"png_file"') == 4
    assert len(list((tmp_path / "step_000000_images").rglob("input_*.png"))) == 1
    assert t.nodes["crit0"].segment.context["images"] is images  # the tree in memory is unchanged
    (back,) = read_trees(dump)
    for k in range(4):
        assert back.nodes[f"crit{k}"].segment.context == t.nodes[f"crit{k}"].segment.context
    d = json.loads(text.splitlines()[0])
    d["nodes"][1]["segment"]["context"]["images"]["0"]["png_file"] = "../../elsewhere.png"
    dump.write_text(json.dumps(d) + "\n")
    with pytest.raises(UserError, match=r"step_000000.jsonl:1: .*outside the dump's folder"):
        list(read_trees(dump))


def test_a_logged_step_dumps_a_sample_spread_over_tree_kinds(tmp_path: Path) -> None:
    """``log.dump_trees`` bounds a logged step's dump (every tree of a 256-prompt step at 512 px is minutes of PNG
    encoding on the training loop): the sample takes first-image and refine trees in turn."""
    from conftest import tiny_overrides

    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path, steps=2) + [
        "log.dump_trees=2", "tree.prompts_per_step=3", "tree.refine_groups_per_step=3", "log.tensorboard=false"])
    Trainer(recipe, tmp_path / "run").train()
    trees = list(read_trees(tmp_path / "run" / "trajectories" / "step_000001.jsonl"))  # step 0 has no parents yet
    assert len(trees) == 2 and sorted(t.meta["kind"] for t in trees) == ["A", "BC"]
