"""TensorBoard output read back with tensorboard's own EventAccumulator: tags, steps, image sizes."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r3_rl.tracking.logger import MetricsLogger
from r3_rl.tracking.tensorboard import (CAPTION_H, CELL, EMPTY_RGB, HEADER_H, LINE, LINE_RGB, fit_cell, grid_size,
                                        image_strip, trajectory_image, trajectory_markdown)
from r3_rl.tracking.views import select_trajectories
from test_tracking_metrics import stage_a_tree, stage_bc_tree, trees


def events(tb_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_fit_cell_is_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = fit_cell(small, 128)
    assert big.shape == (128, 128, 3)
    assert np.array_equal(big[::4, ::4], small) and np.array_equal(big[3::4, 1::4], small)
    assert fit_cell(np.zeros((200, 100, 3), np.uint8), 128).shape == (128, 128, 3)  # any size: one cell size


def test_grid_is_framed_with_a_header_and_fixed_slots() -> None:
    blank = np.full((32, 32, 3), 255, np.uint8)  # a blank image: only its frame shows it is there
    b = np.full((32, 32, 3), 200, np.uint8)
    grid = image_strip([blank, b], ["r0 generate R=0.50", "r1 refine R=1.00 (+0.50)"], header="a photo of x",
                       slots=4)
    h, w = grid_size(4)
    assert grid.shape == (h, w, 3) and (h, w) == (HEADER_H + CELL + CAPTION_H + 4 * LINE, 4 * CELL + 5 * LINE)
    y0 = 2 * LINE + HEADER_H  # header row, then the image row
    for k in range(5):  # vertical grid lines left of, between and right of the four cells (under the header)
        assert np.all(grid[LINE + HEADER_H:, k * (CELL + LINE):k * (CELL + LINE) + LINE] == LINE_RGB)
    assert np.all(grid[:, :LINE] == LINE_RGB) and np.all(grid[:, w - LINE:] == LINE_RGB)
    for y in (0, LINE + HEADER_H, y0 + CELL, h - LINE):  # horizontal lines: top, under the header, under images, bottom
        assert np.all(grid[y:y + LINE] == LINE_RGB)
    assert np.all(grid[y0:y0 + CELL, LINE:LINE + CELL] == 255)  # the blank image, inside its frame
    assert np.all(grid[y0:y0 + CELL, CELL + 2 * LINE:2 * CELL + 2 * LINE] == 200)
    assert np.all(grid[y0:y0 + CELL, 2 * CELL + 3 * LINE:3 * CELL + 3 * LINE] == EMPTY_RGB)  # unused slot: visibly empty
    header = grid[LINE:LINE + HEADER_H, LINE:w - LINE]
    assert (header < 128).any() and (header == 255).mean() > 0.5  # the prompt, dark on white
    caption = grid[y0 + CELL + LINE:y0 + CELL + LINE + CAPTION_H, LINE:LINE + CELL]
    assert (caption < 128).any()
    assert image_strip([b], ["r0"], slots=4).shape == grid.shape  # one image or two: the same scale


def test_trajectory_grid_and_text_follow_the_path() -> None:
    bc = stage_bc_tree()
    (tree, path), = select_trajectories([bc], 1)
    grid = trajectory_image(tree, path, slots=4)
    assert grid is not None and grid.shape == (*grid_size(4), 3)
    assert trajectory_image(tree, path).shape == (*grid_size(2), 3)  # parent image + refined image
    md = trajectory_markdown(tree, path)
    assert "a blue circle" in md and "&lt;think&gt;c0&lt;/think&gt; edit" in md  # survives TB's sanitiser
    assert "r1 refine R=1.00 (+0.50)" in md and "critique 1" in md


def test_selection_alternates_tree_kinds() -> None:
    chosen = select_trajectories([stage_a_tree(), stage_a_tree(), stage_bc_tree()], 2)
    assert [t.meta["kind"] for t, _ in chosen] == ["A", "BC"]


def test_logger_writes_scalars_images_text_histograms(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=True, slots=3)
    for step in range(3):
        logger.log({"1_reward/generate": 0.1 * step, "learner/kl_text": float("nan"), "flag": True}, step)
    logger.log_trajectories(trees(), step=2, limit=4)
    report = {"prompts": 4, "rounds": 1, "accuracy": [0.25, 0.5], "per_tag": {"colors": [0.0, 1.0]},
              "tag_counts": {"colors": 4}, "stop_rate": 0.5, "mean_rounds_used": 1.0, "failed": [0, 0],
              "transitions": [{"round": 1, "improved": 1, "worse": 0, "unchanged": 3}]}
    logger.log_eval(report, 3, trees=[stage_bc_tree()], name="after")
    logger.close()

    acc = events(tmp_path / "tb")
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("1_reward/generate")] == [0, 1, 2]
    assert [e.value for e in acc.Scalars("1_reward/generate")] == pytest.approx([0.0, 0.1, 0.2])
    assert "learner/kl_text" not in tags["scalars"]  # NaN is kept out of TensorBoard ...
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(rows[0]["learner/kl_text"]) and rows[0]["flag"] == 1.0  # ... but not out of the JSONL
    assert acc.Scalars("0_eval/accuracy_round1")[0].step == 3
    assert acc.Scalars("eval_tag/colors/round1")[0].value == 1.0
    assert acc.Scalars("eval/round1/improved")[0].value == 1.0

    # two trees -> two trajectories (one per tree): A path has 1 image, BC path has 2
    assert set(tags["images"]) == {"trajectories/0", "trajectories/1", "eval_trajectories/0"}
    for tag in ("trajectories/0", "trajectories/1"):
        (ev,) = acc.Images(tag)
        assert ev.step == 2 and (ev.height, ev.width) == grid_size(3)  # the logger's 3 slots, whatever the path
        with Image.open(io.BytesIO(ev.encoded_image_string)) as im:
            assert im.size == (ev.width, ev.height)
    assert acc.Images("eval_trajectories/0")[0].step == 3

    texts = set(tags["tensors"])
    assert {"trajectories/0/text/text_summary", "trajectories/1/text/text_summary",
            "eval/table/text_summary"} <= texts
    table = acc.Tensors("eval/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| **overall** | 4 | **0.250** | **0.500** |" in table
    for h in ("hist_reward/generate", "hist_reward/refine", "hist_advantage/generate"):
        (ev,) = acc.Histograms(h)
        assert ev.step == 2
    assert acc.Histograms("hist_reward/generate")[0].histogram_value.num == 2  # failed reward left out


def test_logger_without_tensorboard_writes_jsonl_only(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"a": 1}, 0)
    logger.log_trajectories(trees(), 0)
    logger.close()
    assert not (tmp_path / "tb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "a": 1.0}


def test_labels_tell_failed_from_unscored() -> None:
    from r3_rl.tracking.views import image_caption, text_label
    from test_tracking_inspect import chain

    a = stage_a_tree()
    assert text_label(a.nodes["p2"]) == "plan R=failed"  # training plan whose image reward failed
    assert image_caption(a.nodes["g2"]) == "r0 generate R=failed"
    c = chain(1, [1.0, 0.0], None)
    assert text_label(c.nodes["plan"]) == "plan"  # eval chains score images only
    assert image_caption(c.nodes["img1"], c.nodes["img0"]) == "r1 refine R=0.00 (-1.00)"


def test_a_cell_keeps_a_wide_images_aspect_and_draws_grey_images() -> None:
    """A 512 x 1024 image fills the cell's width and half its height, centred on white (it had been squashed
    into a square); grey HxW and HxWx1 images are drawn (they had raised inside image_strip)."""
    from r3_rl.tracking.tensorboard import CELL, fit_cell, image_strip

    wide = np.zeros((512, 1024, 3), dtype=np.uint8)
    wide[..., 0] = 200
    cell = fit_cell(wide)
    assert cell.shape == (CELL, CELL, 3)
    quarter = CELL // 4
    assert (cell[:quarter] == 255).all() and (cell[-quarter:] == 255).all()
    assert (cell[quarter:-quarter] == (200, 0, 0)).all()
    grey = np.full((16, 16), 90, dtype=np.uint8)
    for image in (grey, grey[..., None]):
        assert (fit_cell(image) == 90).all()
    strip = image_strip([grey, wide, np.full((4, 4, 4), 7, dtype=np.uint8)], ["a", "b", "c"], header="p")
    assert strip.ndim == 3 and strip.shape[2] == 3
    with pytest.raises(ValueError, match="HxW, HxWx1, HxWx3 or HxWx4"):
        fit_cell(np.zeros((4, 4, 2), dtype=np.uint8))
