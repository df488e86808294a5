"""CLIP, Mask2Former, OWLv2 and the geneval reward on tiny models built from configs (no downloads)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.detectors import (DetectedObject, Mask2FormerBackend, Owlv2Backend, box_iou, mask2former_instances,
                                     mask_to_box, normalize_label, select)
from r3_rl.rewards.geneval import ColorClassifier, GenevalReward
from r3_rl.rewards.geneval_rules import GENEVAL_COLORS
from r3_rl.rewards.registry import load_reward
from tiny_vision import save_tiny_clip, save_tiny_mask2former, save_tiny_owlv2

HAS_SCIPY = importlib.util.find_spec("scipy") is not None


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def sample(image: np.ndarray | None, prompt: str = "a photo of a cat", **meta) -> RewardSample:
    return RewardSample(prompt=prompt, metadata=meta, stage="generate", round=0, image=image)


# ---------------------------------------------------------------- CLIP
def test_clip_reward_matches_clip_model_logits(tiny_clip: str) -> None:
    from transformers import AutoProcessor, CLIPModel

    reward = load_reward("clip", model=tiny_clip, device="cpu", scale=2.0)
    reward.setup()
    imgs = [rand_image(40, 50, 1), rand_image(32, 32, 2)]
    prompts = ["a red car", "two dogs on grass"]
    out = reward([sample(imgs[0], prompts[0]), sample(imgs[1], prompts[1]), sample(None)])
    assert out[2].failed and "no image" in out[2].failure
    # Peer: CLIPModel's own forward gives logit_scale * cosine for every (image, text) pair.
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        o = model(**proc(text=prompts, images=[Image.fromarray(i) for i in imgs], return_tensors="pt", padding=True))
    cos = (o.logits_per_image / model.logit_scale.exp()).diagonal()
    for r, c in zip(out[:2], cos.tolist()):
        assert r.components["cosine"] == pytest.approx(c, abs=1e-5)
        assert r.score == pytest.approx(2.0 * c, abs=1e-5)


def test_clip_bad_model_is_one_line_user_error(tmp_path: Path) -> None:
    reward = load_reward("clip", model=str(tmp_path / "nope"), device="cpu")
    with pytest.raises(UserError) as e:
        reward.setup()
    assert "cannot load" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="backend"):
        load_reward("clip", backend="onnx")


def test_open_clip_backend(tmp_path: Path) -> None:
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(UserError, match="open_clip does not import"):
            load_reward("clip", backend="open_clip", model="ViT-B-32", device="cpu").setup()
        pytest.skip("open_clip is not installed (needs torchvision); the missing-package error was checked")
    import open_clip  # pragma: no cover - only where open_clip is installed

    reward = load_reward("clip", backend="open_clip", model="ViT-B-32", pretrained=None, device="cpu")
    reward.setup()
    out = reward([sample(rand_image(64, 64))])
    assert not out[0].failed and -1.0 <= out[0].score <= 1.0
    assert open_clip is not None


# ---------------------------------------------------------------- pure detector helpers
def test_select_threshold_cap_and_nms() -> None:
    objs = [DetectedObject("cat", (0, 0, 10, 10), 0.95), DetectedObject("cat", (1, 1, 10, 10), 0.9),
            DetectedObject("cat", (50, 50, 60, 60), 0.5), DetectedObject("cat", (70, 70, 80, 80), 0.3),
            DetectedObject("dog", (0, 0, 10, 10), 0.31)]
    kept = select(objs, threshold=0.3, max_objects=16, nms_threshold=1.0)
    assert [(o.label, o.score) for o in kept] == [("cat", 0.95), ("cat", 0.9), ("cat", 0.5), ("dog", 0.31)]  # > not >=
    assert [o.score for o in select(objs, 0.3, max_objects=2)] == [0.95, 0.9, 0.31]
    nms = select(objs, 0.3, nms_threshold=0.5)
    assert [o.score for o in nms if o.label == "cat"] == [0.95, 0.5]  # IoU(0.95, 0.9 boxes) = 100/121 >= 0.5
    assert box_iou((0, 0, 10, 10), (1, 1, 10, 10)) == pytest.approx(100 / 121)
    assert box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0


def test_label_normalisation_maps_coco_to_geneval_names() -> None:
    assert normalize_label("mouse") == "computer mouse"
    assert normalize_label("remote") == "tv remote"
    assert normalize_label("Hair_Drier") == "hair drier"
    assert normalize_label("wine glass") == "wine glass"
    assert normalize_label("kitty", {"kitty": "cat"}) == "cat"


def test_mask_to_box_and_padding_crop() -> None:
    m = np.zeros((8, 10), bool)
    m[2:5, 3:7] = True
    assert mask_to_box(m) == (3.0, 2.0, 7.0, 5.0)
    assert mask_to_box(np.zeros((3, 3), bool)) == (0.0, 0.0, 0.0, 0.0)
    # Padded input 16x32 whose left 16x16 is the image; the mask covers the image's left half only.
    cls = torch.tensor([[5.0, -5.0, -5.0]])  # one query, class 0 nearly certain
    logits = torch.full((1, 4, 8), -10.0)
    logits[0, :, :2] = 10.0  # left quarter of the padded mask = left half of the valid region
    inst = mask2former_instances(cls, logits, padded_hw=(16, 32), valid_hw=(16, 16), out_hw=(32, 32))
    (label, score, mask), = [i for i in inst if i[0] == 0]
    assert label == 0 and mask.shape == (32, 32)
    x0, y0, x1, y1 = mask_to_box(mask)
    assert (x0, y0, y1) == (0.0, 0.0, 32.0) and 15 <= x1 <= 17  # ~ half the width, not a quarter
    p = torch.softmax(cls, -1)[0, 0].item()
    assert 0.95 * p < score < p  # class prob x mean mask prob (edge pixels are less sure)


# ---------------------------------------------------------------- colour classification (exact, with a stub CLIP)
PALETTE = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250)}


class StubEncoder:
    """Images -> one-hot of the nearest palette colour of the mean pixel; texts -> one-hot of the colour word."""

    def __init__(self) -> None:
        self.names = list(GENEVAL_COLORS)

    def load(self) -> None: ...
    def unload(self) -> None: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([torch.eye(len(self.names))[next(i for i, c in enumerate(self.names) if f" {c}" in t)] for t in texts])

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for im in images:
            mean = np.asarray(im, dtype=float).reshape(-1, 3).mean(0)
            name = min(PALETTE, key=lambda c: np.abs(np.array(PALETTE[c]) - mean).sum())
            out.append(torch.eye(len(self.names))[self.names.index(name)])
        return torch.stack(out)


def test_color_classifier_uses_mask_and_box() -> None:
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, :] = PALETTE["white"]
    img[10:30, 10:30] = PALETTE["blue"]
    img[10:30, 10:14] = PALETTE["red"]  # a red sliver inside the box but outside the mask
    mask = np.zeros((40, 40), bool)
    mask[10:30, 14:30] = True
    clf = ColorClassifier(StubEncoder())  # type: ignore[arg-type]
    pil = Image.fromarray(img)
    crop = np.asarray(clf.crop(pil, DetectedObject("car", (10, 10, 30, 30), 0.9, mask)))
    assert crop.shape == (20, 20, 3) and tuple(crop[0, 0]) == (0x99, 0x99, 0x99) and tuple(crop[5, 10]) == PALETTE["blue"]
    assert clf.classify(pil, [DetectedObject("car", (10, 10, 30, 30), 0.9, mask)], "car") == ["blue"]
    assert clf.classify(pil, [DetectedObject("car", (10, 10, 14, 30), 0.9)], "car") == ["red"]  # no mask: raw crop
    w = clf.weights("car")
    assert w.shape == (10, 10) and torch.allclose(w.norm(dim=-1), torch.ones(10))


# ---------------------------------------------------------------- geneval glue with a scripted detector
class ScriptedBackend:
    def __init__(self, objects: list[list[DetectedObject]]) -> None:
        self.objects, self.calls = objects, []

    def load(self) -> None: ...
    def unload(self) -> None: ...

    def detect(self, images, queries, min_score):
        self.calls.append((len(images), queries, min_score))
        return [self.objects.pop(0) for _ in images]


def scripted_reward(objects: list[list[DetectedObject]], **kw) -> GenevalReward:
    r = GenevalReward(device="cpu", **kw)
    r.backend = ScriptedBackend(objects)
    r.colors = ColorClassifier(StubEncoder())  # type: ignore[arg-type]
    return r


def test_geneval_reward_thresholds_colours_and_scores() -> None:
    img = np.full((64, 64, 3), PALETTE["white"], np.uint8)
    img[0:20, 0:20] = PALETTE["red"]
    img[40:60, 40:60] = PALETTE["green"]
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    colour = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                               {"class": "bus", "count": 1, "color": "red"}]}
    cats = [DetectedObject("cat", (0, 0, 10, 10), 0.95), DetectedObject("cat", (30, 30, 40, 40), 0.92),
            DetectedObject("cat", (50, 0, 60, 10), 0.5)]  # third cat only passes the non-counting threshold
    cars = [DetectedObject("car", (0, 0, 20, 20), 0.8), DetectedObject("bus", (40, 40, 60, 60), 0.7)]
    r = scripted_reward([list(cats), list(cats), list(cars)], batch_size=1)
    s_count = sample(img, **counting)
    s_two = sample(img, **{**counting, "tag": "two_object"})
    out = r([s_count, s_two, sample(img, **colour), sample(None, **colour), sample(img, include=[{"class": "cat"}])])
    assert out[0].score == 1.0 and out[0].components["correct"] == 1.0  # 0.5 cat dropped at the 0.9 threshold
    assert not out[1].failed and out[1].components["correct"] == 0.0 and out[1].score == pytest.approx(0.5)  # 3 of 2 -> 1-1/2
    assert out[2].components["correct"] == 0.0 and out[2].score == pytest.approx(0.75)  # car red, bus green
    assert "bus" in out[2].reason
    assert out[3].failed and out[4].failed and "metadata" in out[4].failure
    assert r.backend.calls[0][2] == 0.9 and r.backend.calls[1][2] == 0.3
    rb = scripted_reward([list(cats)], binary=True)
    assert rb([s_two])[0].score == 0.0


def test_geneval_options_are_checked() -> None:
    with pytest.raises(UserError, match="detector"):
        load_reward("geneval", detector="yolo")
    r = load_reward("geneval", detector="owlv2", device="cpu")
    assert (r.threshold, r.counting_threshold, r.nms_threshold) == (0.2, 0.3, 0.5)
    r = load_reward("geneval", device="cpu", threshold=0.4)
    assert (r.threshold, r.counting_threshold, r.nms_threshold) == (0.4, 0.9, 1.0)


# ---------------------------------------------------------------- real tiny detectors
def test_owlv2_backend_on_tiny_model(tmp_path: Path, tiny_clip: str) -> None:
    path = save_tiny_owlv2(tmp_path / "owl")
    backend = Owlv2Backend(path, device="cpu")
    images = [Image.fromarray(rand_image(40, 60, 3)), Image.fromarray(rand_image(32, 32, 4))]
    queries = [["cat", "dog"], ["car"]]
    with pytest.warns(UserWarning, match="PIL") if not HAS_SCIPY else _no_warning():
        found = backend.detect(images, queries, min_score=0.0)
    assert len(found) == 2 and found[0] and found[1]
    for im, qs, objs in zip(images, queries, found):
        for o in objs:
            assert o.label in qs and 0.0 <= o.score <= 1.0 and o.mask is None
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 <= x1 <= im.width and 0 <= y0 <= y1 <= im.height
    reward = load_reward("geneval", detector="owlv2", model=path, clip_model=tiny_clip, device="cpu", threshold=0.0,
                         max_objects=1)  # exactly one (random) cat survives
    reward.setup()
    meta = {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"}]}
    out = reward([sample(rand_image(40, 60, 3), **meta)])
    assert not out[0].failed and out[0].score in (0.5, 1.0)  # 1 term for presence + 1 for colour (0 or 1)


class _no_warning:
    def __enter__(self): return self
    def __exit__(self, *a): return False


@pytest.mark.skipif(not HAS_SCIPY, reason="transformers' Mask2Former needs scipy (not installed here)")
def test_mask2former_matches_transformers_postprocess_on_unpadded_input(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    path = save_tiny_mask2former(tmp_path / "m2f", ["cat", "mouse", "remote"], size=384)
    proc, model = AutoImageProcessor.from_pretrained(path), Mask2FormerForUniversalSegmentation.from_pretrained(path).eval()
    img = Image.fromarray(rand_image(384, 384, 5))
    inputs = proc(images=[img], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (384, 384)
    with torch.no_grad():
        out = model(**inputs)
    q = out.class_queries_logits.shape[1]
    ours = mask2former_instances(out.class_queries_logits[0], out.masks_queries_logits[0], (384, 384), (384, 384),
                                 (384, 384), top_k=q, min_score=-1.0)
    ref = proc.post_process_instance_segmentation(out, threshold=-1.0, target_sizes=[(384, 384)], return_binary_maps=True)[0]
    ref_pairs = sorted((s["label_id"], round(s["score"], 4)) for s in ref["segments_info"])
    ours_nonempty = sorted((lbl, round(s, 4)) for lbl, s, m in ours if m.any())
    assert ours_nonempty == ref_pairs
    backend = Mask2FormerBackend(path, device="cpu")
    dets = backend.detect([Image.fromarray(rand_image(50, 70, 6))], [[]], min_score=0.0)[0]
    assert {d.label for d in dets} <= {"cat", "computer mouse", "tv remote"}
    for d in dets:
        assert d.mask is not None and d.mask.shape == (50, 70) and d.box == mask_to_box(d.mask)


@pytest.mark.skipif(not HAS_SCIPY, reason="transformers' Mask2Former needs scipy (not installed here)")
def test_geneval_reward_end_to_end_on_tiny_mask2former(tmp_path: Path, tiny_clip: str) -> None:
    path = save_tiny_mask2former(tmp_path / "m2f", ["cat", "dog"])
    reward = load_reward("geneval", model=path, clip_model=tiny_clip, device="cpu", threshold=0.0, batch_size=2)
    reward.setup()
    metas = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
             {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]},
             {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}]
    out = reward([sample(rand_image(48, 64, i), **m) for i, m in enumerate(metas)])
    for o in out:
        assert not o.failed, o.failure
        assert set(o.components) == {"correct", "strict_correct", "partial"} and o.score == o.components["partial"]


def test_a_process_holds_one_copy_of_each_reward_model(tmp_path: Path, tiny_clip: str) -> None:
    """The trainer holds the task rewards and the eval rewards: with GenEval in both its detector and CLIP were
    loaded twice onto the trainer's GPU (about 2 GB each in fp32).  One copy per (model, device, dtype), freed
    once no reward holds it."""
    import gc
    import weakref

    path = save_tiny_owlv2(tmp_path / "owl")
    task, ev, half = (load_reward("geneval", detector="owlv2", model=path, clip_model=tiny_clip, device="cpu", **kw)
                      for kw in ({"binary": False}, {"binary": True}, {"dtype": "bfloat16"}))
    for r in (task, ev, half):
        r.setup()
    assert task.backend.model is ev.backend.model and task.colors.encoder.model is ev.colors.encoder.model
    assert half.backend.model is not task.backend.model and next(half.backend.model.parameters()).dtype == torch.bfloat16
    detector, clip = weakref.ref(task.backend.model), weakref.ref(task.colors.encoder.model)
    task.teardown()
    gc.collect()
    assert detector() is ev.backend.model  # still held by the eval reward
    ev.teardown()
    half.teardown()
    gc.collect()
    assert detector() is None and clip() is None
