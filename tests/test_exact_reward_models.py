"""Exact checks of the reward models' wrappers (round 11E audit): checklist questions and their GenEval checks,
self/verdict consistency, detector glue (selection, Mask2Former post-processing, both backends' detect with
scripted models), CLIP helpers and the geneval reward's colour classifier and options.

Every expected value is written out by hand; detectors and CLIP are replaced by small scripted stand-ins.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.base import RewardSample, Turn
from r3_rl.rewards.checklists import YesNo, geneval_questions, load_records, number_word, plural, questions_for, tiif_questions
from r3_rl.rewards.clip import ClipEncoder, load_error, resolve_device, resolve_dtype, shared_model, to_pil
from r3_rl.rewards.detectors import (DetectedObject, Mask2FormerBackend, Owlv2Backend, box_iou, mask2former_instances,
                                     normalize_label, select)
from r3_rl.rewards.geneval import ColorClassifier, GenevalReward, _classes
from r3_rl.rewards.geneval_rules import GENEVAL_COLORS
from r3_rl.rewards.registry import load_reward
from r3_rl.rewards.self_consistency import SelfConsistencyReward, VerdictConsistencyReward, agreement
from test_rewards_models import sample, scripted_reward

RED = np.zeros((8, 8, 3), np.uint8) + np.array([200, 0, 0], np.uint8)
BLUE = np.zeros((8, 8, 3), np.uint8) + np.array([0, 0, 200], np.uint8)


# ---------------------------------------------------------------- checklists
def test_number_words_and_plurals() -> None:
    assert number_word(0) == "zero"
    assert [plural(w) for w in ("box", "scissors", "fox", "glass")] == ["boxes", "scissors", "foxes", "glasses"]


def test_geneval_question_checks_position() -> None:
    meta = {"include": [{"class": "laptop", "count": 1, "color": "red"}, {"class": "cow", "count": 2, "position": ["right of", 0]}]}
    qs = geneval_questions(meta)
    assert [(q.question, q.answer) for q in qs] == [
        ("Is there a red laptop in the image?", "yes"), ("Are there two cows in the image?", "yes"),
        ("Are the two cows to the right of the red laptop?", "yes")]
    assert [q.check for q in qs] == [
        {"include": [{"class": "laptop", "count": 1, "color": "red"}]},
        {"include": [{"class": "cow", "count": 2}]},
        {"include": [{"class": "laptop", "count": 1, "color": "red"}, {"class": "cow", "count": 2, "position": ["right of", 0]}]}]


def test_geneval_question_checks_exact_count_and_absence() -> None:
    meta = {"include": [{"class": "apple", "count": 1}],
            "exclude": [{"class": "apple", "count": 2}, {"class": "dog", "count": 1}, {"class": "bird", "count": 3}]}
    qs = geneval_questions(meta)
    assert qs == [YesNo("Is there exactly one apple in the image?", "yes"), YesNo("Is there a dog in the image?", "no"),
                  YesNo("Are there three or more birds in the image?", "no")]
    assert [q.check for q in qs] == [
        {"include": [{"class": "apple", "count": 1}], "exclude": [{"class": "apple", "count": 2}]},
        {"include": [{"class": "dog", "count": 1}]}, {"include": [{"class": "bird", "count": 3}]}]


def test_geneval_question_checks_region_and_size_only_against_smaller_objects() -> None:
    meta = {"include": [{"class": "clock", "count": 1, "region": "below", "size": "smaller"},
                        {"class": "apple", "count": 1, "size": "larger"}, {"class": "cat", "count": 1}]}
    qs = geneval_questions(meta)
    assert [q.question for q in qs] == [
        "Is there a clock in the image?", "Is there an apple in the image?", "Is there a cat in the image?",
        "Is the clock in the bottom half of the image?", "Is the apple larger than the clock?"]
    assert [q.check for q in qs[3:]] == [
        {"include": [{"class": "clock", "count": 1, "region": "below"}]},
        {"include": [{"class": "apple", "count": 1, "size": "larger"}, {"class": "clock", "count": 1, "size": "smaller"}]}]


def test_questions_for_exclude_only_and_empty_metadata() -> None:
    assert questions_for({"exclude": [{"class": "dog", "count": 1}]}) == [YesNo("Is there a dog in the image?", "no")]
    with pytest.raises(UserError, match="^metadata has no include/exclude clauses to ask about$"):
        geneval_questions({"include": [], "exclude": []})


def test_tiif_blank_question_is_refused() -> None:
    with pytest.raises(UserError, match=r"yn_question_list\[1\] must be a non-empty string"):
        tiif_questions({"yn_question_list": ["Is it red?", "   "], "yn_answer_list": ["yes", "no"]})


def test_load_records_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "none.jsonl"
    with pytest.raises(UserError) as e:
        load_records(p)
    assert str(e.value) == f"{p}: file not found"
    with pytest.raises(UserError) as e:  # a folder named where the prompt file should be: say so
        load_records(tmp_path)
    assert str(e.value) == f"{tmp_path}: file is not a regular file"


# ---------------------------------------------------------------- self consistency
class Scripted:
    """answer_yes_no: P(yes) = table[(red image?, question)]; records the batch sizes."""

    def __init__(self, table: dict[tuple[bool, str], float]) -> None:
        self.table, self.calls = table, []

    def answer_yes_no(self, images, questions):
        self.calls.append(len(questions))
        return [self.table[(bool(im.image[..., 0].mean() > 128), q)] for im, q in zip(images, questions)]


def _s(image, meta, history=None, stage="generate", rnd=0) -> RewardSample:
    return RewardSample(prompt="p", metadata=meta, stage=stage, round=rnd, image=image, history=history or [])


def test_agreement_refuses_no_questions() -> None:
    with pytest.raises(ValueError, match="0 probabilities for 0 questions"):
        agreement([], [])


def test_self_consistency_mixed_batch_counts_and_edges() -> None:
    one = {"yn_question_list": ["Is there a cat?"], "yn_answer_list": ["yes"]}
    three = {"yn_question_list": ["Is there a cat?", "Is it day?", "Is it wet?"], "yn_answer_list": ["yes", "no", "yes"]}
    pol = Scripted({(True, "Is there a cat?"): 0.9, (False, "Is there a cat?"): 0.25, (True, "Is it day?"): 0.0,
                    (True, "Is it wet?"): 1.0})
    r = SelfConsistencyReward()
    r.bind_policy(pol)
    out = r([_s(RED, three), _s(BLUE, one)])  # one call, two different images
    assert pol.calls == [4]
    assert out[0].score == pytest.approx((0.9 + 1.0 + 1.0) / 3)  # p = 0 and p = 1 are probabilities
    assert out[0].components == {"soft": pytest.approx(2.9 / 3), "accuracy": 1.0, "questions": 3.0}
    assert out[1].score == 0.25 and out[1].components == {"soft": 0.25, "accuracy": 0.0, "questions": 1.0}
    zero = SelfConsistencyReward(batch_size=0)  # clamped to 1
    zero.bind_policy(pol)
    assert [o.score for o in zero([_s(BLUE, one), _s(RED, one)])] == [0.25, 0.9] and pol.calls[-2:] == [1, 1]


# ---------------------------------------------------------------- verdict consistency
def test_verdict_judges_the_last_critique_against_the_image_just_before_it() -> None:
    hist = [Turn("generate", 0, image=BLUE, reward=0.5), Turn("reflect", 1, text="<think>x</think>Make it red."),
            Turn("refine", 1, image=RED, reward=1.0), Turn("reflect", 2, text="<think>y</think>Make it bluer.")]
    (out,) = VerdictConsistencyReward()([_s(None, {}, hist, "reflect", 2)])
    assert out.score == 0.0 and out.components == {"stop": 0.0, "correct": 1.0}  # an edit of a correct image


def test_verdict_default_threshold_is_one() -> None:
    hist = [Turn("generate", 0, image=RED, reward=0.6), Turn("reflect", 1, text="<think>x</think>no further edit needed")]
    (out,) = VerdictConsistencyReward()([_s(None, {}, hist, "reflect", 1)])
    assert out.score == 0.0 and out.components == {"stop": 1.0, "correct": 0.0}


TASK = '''
from r3_rl.rewards.base import Reward, RewardOutput

def shape(samples):
    """1 when the task sees the critiqued image as a generate sample of round 0 with its history up to it."""
    return [float(s.stage == "generate" and s.round == 0 and len(s.history) == 1 and s.history[0].image is s.image)
            for s in samples]

def nan(samples):
    return [float("nan") for _ in samples]

class Counted(Reward):
    name = "counted"
    log = []

    def setup(self):
        Counted.log.append("setup")
        self.live = True

    def teardown(self):
        Counted.log.append("teardown")
        self.live = False

    def __call__(self, samples):
        return [RewardOutput(score=1.0) if self.live else RewardOutput(failure="torn down") for _ in samples]
'''


def test_verdict_task_reward_sees_the_image_sample(tmp_path: Path) -> None:
    f = tmp_path / "task.py"
    f.write_text(TASK)
    hist = [Turn("generate", 0, image=BLUE), Turn("reflect", 1, text="<think>x</think>Make it red.")]
    (out,) = VerdictConsistencyReward(task={"name": f"{f}:shape"})([_s(None, {}, hist, "reflect", 1)])
    assert out.components == {"stop": 0.0, "correct": 1.0} and out.score == 0.0
    (bad,) = VerdictConsistencyReward(task={"name": f"{f}:nan"})([_s(None, {}, hist, "reflect", 1)])
    assert bad.failed and bad.failure.startswith("task reward failed: ")


def test_verdict_task_is_rebuilt_after_teardown(tmp_path: Path) -> None:
    f = tmp_path / "task.py"
    f.write_text(TASK)
    r = VerdictConsistencyReward(task={"name": f"{f}:Counted"})
    hist = [Turn("generate", 0, image=BLUE), Turn("reflect", 1, text="<think>x</think>no further edit needed")]
    assert r([_s(None, {}, hist)])[0].score == 1.0
    r.teardown()
    out = r([_s(None, {}, hist)])[0]
    assert not out.failed and out.score == 1.0
    assert type(r.task).log == ["setup", "teardown", "setup"]


def test_verdict_task_option_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="task must be"):
        VerdictConsistencyReward(task={"name": "clip", "opts": {}})
    with pytest.raises(UserError, match="task.options must be a mapping"):
        VerdictConsistencyReward(task={"name": "clip", "options": [1]})
    with pytest.raises(UserError, match="^verdict_consistency option task: "):
        VerdictConsistencyReward(task={"name": str(tmp_path / "none.py") + ":f"})


# ---------------------------------------------------------------- detectors: pure helpers
def test_aliases_iou_of_empty_boxes_and_nms_per_class() -> None:
    assert [normalize_label(n) for n in ("sofa", "motorbike", "tvmonitor")] == ["couch", "motorcycle", "tv"]
    assert box_iou((5, 5, 2, 2), (5, 5, 2, 2)) == 0.0  # both boxes empty: no overlap, not a division by zero
    cat, dog = DetectedObject("cat", (0, 0, 9, 9), 0.9), DetectedObject("dog", (0, 0, 9, 9), 0.8)
    assert select([cat, dog], threshold=0.3, nms_threshold=0.5) == [cat, dog]


def _instances(mask_logits: torch.Tensor, min_score: float = 0.0):
    # 4x4 everywhere: both interpolations are the identity, so mask values are exact
    return mask2former_instances(torch.tensor([[5.0, -5.0]]), mask_logits[None], (4, 4), (4, 4), (4, 4), min_score=min_score)


def test_mask2former_score_is_mean_probability_inside_the_mask() -> None:
    p = torch.softmax(torch.tensor([5.0, -5.0]), -1)[0].item()
    logits = torch.full((4, 4), -1.0)
    logits[:, :2] = 2.0
    ((label, score, mask),) = _instances(logits)
    assert label == 0 and mask.sum() == 8 and score == pytest.approx(p * torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-5)
    assert _instances(torch.zeros(4, 4)) == []  # logit 0 is outside the mask: an empty mask scores 0
    assert _instances(torch.full((4, 4), 0.1), min_score=0.6) == []  # class prob passes 0.6, x mask 0.525 does not


class _M2FProcessor:
    def __call__(self, images, return_tensors):
        mask = torch.zeros(len(images), 32, 64, dtype=torch.long)
        mask[:, :16, :48] = 1  # each 32x96 image is resized into the top-left 16x48 of a 32x64 padded input
        return {"pixel_values": torch.zeros(len(images), 3, 32, 64), "pixel_mask": mask}


class _M2FModel:
    def __call__(self, pixel_values, pixel_mask):
        cls = torch.tensor([[[5.0, -5.0], [4.0, -5.0]]]).repeat(len(pixel_values), 1, 1)
        masks = torch.full((len(pixel_values), 2, 8, 16), -10.0)
        masks[:, :, :4, :6] = 10.0  # left half of the valid region: padded columns 0..23
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)


def test_mask2former_backend_crops_padding_and_keeps_top_k() -> None:
    b = Mask2FormerBackend("unused", device="cpu", top_k=1)
    b.model, b.processor, b.labels = _M2FModel(), _M2FProcessor(), {0: "cat"}
    (objs,) = b.detect([Image.new("RGB", (96, 32))], [["cat"]], min_score=0.0)
    assert len(objs) == 1 and objs[0].label == "cat" and objs[0].mask.shape == (32, 96)
    assert objs[0].box == (0.0, 0.0, 48.0, 32.0)


def test_mask2former_load_applies_the_label_map(tmp_path: Path) -> None:
    from tiny_vision import save_tiny_mask2former

    b = Mask2FormerBackend(save_tiny_mask2former(tmp_path / "m2f", ["cat", "mouse", "remote"]), device="cpu",
                           label_map={"cat": "kitten"})
    b.load()
    assert b.labels == {0: "kitten", 1: "computer mouse", 2: "tv remote"}  # mapped first, COCO aliases otherwise


class _OwlProcessor:
    def __init__(self) -> None:
        self.texts, self.threshold = None, None

    def __call__(self, text, images, return_tensors):
        self.texts = text
        return {"pixel_values": torch.zeros(len(images), 3, 4, 4), "input_ids": torch.zeros(len(images), 1, dtype=torch.long)}

    def post_process_grounded_object_detection(self, out, threshold, target_sizes):
        self.threshold = threshold
        assert target_sizes == [(20, 40)]
        return [{"boxes": torch.tensor([[-5.0, -3.0, 50.0, 30.0], [1.0, 2.0, 3.0, 4.0]]), "scores": torch.tensor([0.7, 0.9]),
                 "labels": torch.tensor([0, 1])}]  # label 1 is a padded query slot


def test_owlv2_detect_clamps_boxes_and_drops_padded_queries() -> None:
    b = Owlv2Backend("unused", device="cpu")
    b.model, b.processor = (lambda **kw: None), _OwlProcessor()
    (objs,) = b.detect([Image.new("RGB", (40, 20))], [["cat"]], min_score=0.15)
    assert [(o.label, o.box, o.score) for o in objs] == [("cat", (0.0, 0.0, 40.0, 20.0), pytest.approx(0.7))]
    assert b.processor.texts == [["a photo of a cat"]] and b.processor.threshold == 0.15
    with pytest.raises(UserError, match="query_template must contain"):
        Owlv2Backend(device="cpu", query_template="a photo of a cat")


# ---------------------------------------------------------------- clip helpers
def test_device_dtype_and_image_helpers() -> None:
    with pytest.raises(UserError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(UserError, match="^dtype 'float64' is not one of float32, float16, bfloat16$"):
        resolve_dtype("float64")
    assert to_pil(Image.new("RGBA", (2, 2))).mode == "RGB" and to_pil(np.zeros((2, 2), np.uint8)).mode == "RGB"
    e = load_error("clip", "m", OSError("no file\nTraceback: more"))
    assert str(e) == ("clip: cannot load 'm' (OSError: no file); give a hub id or a local folder written by "
                      "save_pretrained")
    with pytest.raises(UserError, match="'pretrained' is for backend open_clip"):
        ClipEncoder(pretrained="openai", device="cpu")
    assert ClipEncoder("ViT-B-32", backend="open_clip", device="cpu").weights() == []


def test_shared_model_is_one_copy_per_device_and_dtype() -> None:
    made: list[int] = []

    def load() -> torch.nn.Module:
        made.append(1)
        return torch.nn.Linear(1, 1)

    a = shared_model("t-11e", "n", torch.device("cpu"), torch.float32, load)
    b = shared_model("t-11e", "n", torch.device("cpu"), torch.float32, load)
    c = shared_model("t-11e", "n", torch.device("meta"), torch.float32, load)
    assert a is b and c is not a and c.weight.device.type == "meta" and len(made) == 2


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_vision import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip11e"))


def test_clip_reward_truncates_long_prompts(tiny_clip: str) -> None:
    r = load_reward("clip", model=tiny_clip, device="cpu")
    r.setup()
    out = r([sample(RED, "a very long prompt " * 5), sample(RED, "a cat")])  # 95 characters, 24 positions
    assert all(not o.failed and -1.0 <= o.score <= 1.0 for o in out)


# Found by round 11E: ClipEncoder kept batch_size 0 (geneval and self_consistency clamp theirs to 1), so a clip
# reward with batch_size: 0 passed the recipe check and then failed every scoring call with range()'s ValueError.
def test_clip_batch_size_zero_is_clamped_to_one(tiny_clip: str) -> None:
    """Catches ClipEncoder taking batch_size 0 as is: range(0, n, 0) raised on the first image."""
    r = load_reward("clip", model=tiny_clip, device="cpu", batch_size=0)
    assert r.encoder.batch_size == 1
    r.setup()
    ref = load_reward("clip", model=tiny_clip, device="cpu")
    ref.setup()
    samples = [sample(RED, "a red square"), sample(BLUE, "a blue square")]
    assert [o.score for o in r(samples)] == pytest.approx([o.score for o in ref(samples)], abs=1e-5)


# ---------------------------------------------------------------- geneval glue
class _TextStub:
    """Text k of a call embeds to one-hot(k) (k + 30 in a call about a bus); records the texts."""

    def __init__(self) -> None:
        self.texts: list[list[str]] = []

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.texts.append(list(texts))
        off = 30 if any("bus" in t for t in texts) else 0
        return torch.stack([torch.eye(60)[k + off] for k in range(len(texts))])


def test_colour_weights_templates_mean_and_per_class_cache() -> None:
    enc = _TextStub()
    clf = ColorClassifier(enc)  # type: ignore[arg-type]
    w = clf.weights("car")
    assert enc.texts[0][:3] == ["a photo of a red car", "a photo of a red-colored car", "a photo of a red object"]
    assert len(enc.texts[0]) == 3 * len(GENEVAL_COLORS) and enc.texts[0][-1] == "a photo of a white object"
    expect = torch.zeros(10, 60)
    for c in range(10):
        expect[c, 3 * c:3 * c + 3] = 3 ** -0.5  # mean of three orthogonal unit vectors, renormalised
    assert torch.allclose(w, expect)
    wb = clf.weights("bus")
    assert torch.allclose(wb, torch.roll(expect, 30, dims=1)) and torch.equal(clf.weights("car"), w)
    assert len(enc.texts) == 2  # cached per class


def test_classes_in_order_without_duplicates() -> None:
    meta = {"include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}, {"class": "cat", "count": 2}],
            "exclude": [{"class": "bird", "count": 1}, {"class": "dog", "count": 2}]}
    assert _classes(meta) == ["cat", "dog", "bird"]


def _img(w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), 250, np.uint8)


def test_geneval_region_uses_width_and_height() -> None:
    meta = {"tag": "region", "include": [{"class": "cat", "count": 1, "region": "left"}]}
    r = scripted_reward([[DetectedObject("cat", (40, 0, 50, 10), 0.9)]])
    (out,) = r([sample(_img(100, 20), **meta)])  # centre x 45 < 100 / 2
    assert out.components["correct"] == 1.0


def test_geneval_max_objects_nms_and_position_threshold_options() -> None:
    two = {"tag": "counting_free", "include": [{"class": "cat", "count": 2}]}
    cats = [DetectedObject("cat", (0, 0, 9, 9), 0.95), DetectedObject("cat", (0, 0, 9, 8), 0.9)]  # IoU 0.9
    assert scripted_reward([list(cats)])([sample(_img(32, 32), **two)])[0].components["correct"] == 1.0
    assert scripted_reward([list(cats)], max_objects=1)([sample(_img(32, 32), **two)])[0].components["correct"] == 0.0
    assert scripted_reward([list(cats)], nms_threshold=0.5)([sample(_img(32, 32), **two)])[0].components["correct"] == 0.0
    pos = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    objs = [DetectedObject("cat", (0, 0, 10, 10), 0.9), DetectedObject("dog", (12, 0, 22, 10), 0.9)]
    # centres 12 apart; margin 0.1 * (10 + 10) = 2 leaves "left of", 0.6 * 20 = 12 leaves nothing
    assert scripted_reward([list(objs)])([sample(_img(32, 32), **pos)])[0].components["correct"] == 1.0
    assert scripted_reward([list(objs)], position_threshold=0.6)([sample(_img(32, 32), **pos)])[0].components["correct"] == 0.0


def test_geneval_batch_results_stay_with_their_samples() -> None:
    r = scripted_reward([[DetectedObject("cat", (0, 0, 9, 9), 0.9)], [DetectedObject("dog", (0, 0, 9, 9), 0.9)]], batch_size=2)
    out = r([sample(_img(16, 16), include=[{"class": "cat", "count": 1}]),
             sample(_img(16, 16), include=[{"class": "dog", "count": 1}])])
    assert [o.components["correct"] for o in out] == [1.0, 1.0]
    assert r.backend.calls == [(2, [["cat"], ["dog"]], 0.3)]


def test_geneval_passes_its_options_to_backend_and_crop() -> None:
    r = GenevalReward(device="cpu", label_map={"kitty": "cat"}, crop_background="#000")
    assert r.backend.label_map == {"kitty": "cat"}
    mask = np.zeros((4, 4), bool)
    crop = np.asarray(r.colors.crop(Image.new("RGB", (4, 4), (250, 250, 250)), DetectedObject("cat", (0, 0, 4, 4), 0.9, mask)))
    assert (crop == 0).all()
    owl = GenevalReward(detector="owlv2", device="cpu", query_template="an image of {}")
    assert owl.backend.query_template == "an image of {}"
