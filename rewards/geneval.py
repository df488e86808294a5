"""The ``geneval`` reward: detector + CLIP colours + GenEval's rule engine.

Pipeline per image, as GenEval's ``evaluate_images.py`` does it:
  1. detect objects (Mask2Former COCO instance segmentation, GenEval's detector; or OWLv2
     open-vocabulary, queried with the prompt's class names);
  2. keep, per class, detections with confidence > 0.3 (> 0.9 when the tag is ``counting``), at most
     16, optional NMS (off for Mask2Former, as in GenEval);
  3. colour of the most confident detections of each class with a colour clause: CLIP zero-shot over
     GenEval's ten colours with GenEval's three templates, on the box crop where everything outside the
     instance mask is painted grey (#999);
  4. :func:`r3_rl.rewards.geneval_rules.evaluate`: binary ``correct`` (GenEval) and partial-credit
     ``score`` (Flow-GRPO's reward server).  Training uses ``score``; ``binary: true`` (evaluation) uses
     ``correct``.  Both, and ``strict_correct``, are logged as components.
OWLv2 defaults (threshold 0.2, counting 0.3, NMS 0.5) are ours -- GenEval's thresholds are calibrated
for Mask2Former; tune them for another detector.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.clip import DEFAULT_CLIP, ClipEncoder, to_pil
from r3_rl.rewards.detectors import DetectedObject, Mask2FormerBackend, Owlv2Backend, select
from r3_rl.rewards.geneval_rules import GENEVAL_COLORS, Detection, evaluate, group_detections, validate_metadata

COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
DETECTOR_DEFAULTS: dict[str, dict[str, float]] = {
    "mask2former": {"threshold": 0.3, "counting_threshold": 0.9, "nms_threshold": 1.0},
    "owlv2": {"threshold": 0.2, "counting_threshold": 0.3, "nms_threshold": 0.5},
}


class ColorClassifier:
    """GenEval's colour classification: CLIP zero-shot on masked box crops, one classifier per class."""

    def __init__(self, encoder: ClipEncoder, colors: tuple[str, ...] = GENEVAL_COLORS, background: str = "#999") -> None:
        self.encoder, self.colors, self.background = encoder, colors, background
        self._weights: dict[str, torch.Tensor] = {}

    def weights(self, classname: str) -> torch.Tensor:
        """[num_colours, dim]: mean of the normalised template embeddings, renormalised."""
        if classname not in self._weights:
            texts = [t.format(c=c, cls=classname) for c in self.colors for t in COLOR_TEMPLATES]
            emb = self.encoder.encode_texts(texts).view(len(self.colors), len(COLOR_TEMPLATES), -1).mean(1)
            self._weights[classname] = torch.nn.functional.normalize(emb, dim=-1)
        return self._weights[classname]

    def crop(self, image: Image.Image, obj: DetectedObject) -> Image.Image:
        if obj.mask is not None:
            blank = Image.new("RGB", image.size, self.background)
            image = Image.composite(image, blank, Image.fromarray(obj.mask.astype("uint8") * 255, mode="L"))
        x0, y0, x1, y1 = (round(v) for v in obj.box)  # PIL rounds the box: floor the crop at 1 pixel after it
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # a degenerate box still gives a 1-pixel crop
        return image.crop((x0, y0, x1, y1))

    def classify(self, image: Image.Image, objects: list[DetectedObject], classname: str) -> list[str]:
        if not objects:
            return []
        feats = self.encoder.encode_images([self.crop(image, o) for o in objects])
        idx = (feats @ self.weights(classname).T).argmax(-1).tolist()
        return [self.colors[i] for i in idx]


class GenevalReward(Reward):
    """GenEval rules on detections; options are listed in :meth:`__init__`'s signature (see module doc)."""

    name = "geneval"

    def __init__(self, detector: str = "mask2former", model: str | None = None, binary: bool = False,
                 threshold: float | None = None, counting_threshold: float | None = None,
                 counting_tags: list[str] | tuple[str, ...] = ("counting",), max_objects: int = 16,
                 nms_threshold: float | None = None, position_threshold: float = 0.1,
                 clip_model: str = DEFAULT_CLIP, clip_backend: str = "transformers", clip_pretrained: str | None = None,
                 crop_background: str = "#999", device: str = "auto", dtype: str = "float32", batch_size: int = 8,
                 label_map: dict[str, str] | None = None, query_template: str = "a photo of a {}") -> None:
        if detector not in DETECTOR_DEFAULTS:
            raise UserError(f"geneval option detector: {detector!r} is not one of {', '.join(DETECTOR_DEFAULTS)}")
        d = DETECTOR_DEFAULTS[detector]
        self.detector_name, self.binary = detector, bool(binary)
        self.threshold = d["threshold"] if threshold is None else float(threshold)
        self.counting_threshold = d["counting_threshold"] if counting_threshold is None else float(counting_threshold)
        self.nms_threshold = d["nms_threshold"] if nms_threshold is None else float(nms_threshold)
        if isinstance(counting_tags, str) or not all(isinstance(t, str) for t in counting_tags):
            # a bare string was read as its letters ({"c", "o", ...}): the counting threshold never applied
            raise TypeError(f"geneval reward option 'counting_tags' must be a list of tags, got {counting_tags!r}")
        self.counting_tags, self.max_objects = set(counting_tags), int(max_objects)
        self.position_threshold, self.batch_size = float(position_threshold), max(1, int(batch_size))
        self.backend: Any = (Mask2FormerBackend(model, device, dtype, label_map=label_map) if detector == "mask2former"
                             else Owlv2Backend(model, device, dtype, query_template=query_template))
        self.colors = ColorClassifier(ClipEncoder(clip_model, clip_backend, clip_pretrained, device, dtype), background=crop_background)

    def setup(self) -> None:
        self.backend.load()
        self.colors.encoder.load()

    def teardown(self) -> None:
        self.backend.unload()
        self.colors.encoder.unload()

    def weights(self) -> list[str]:
        return [self.backend.model_name, *self.colors.encoder.weights()]

    def threshold_for(self, metadata: dict[str, Any]) -> float:
        return self.counting_threshold if metadata.get("tag") in self.counting_tags else self.threshold

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        out: list[RewardOutput | None] = [None] * len(samples)
        todo = []
        for i, s in enumerate(samples):
            if s.image is None:
                out[i] = RewardOutput(failure="no image to score")
                continue
            try:
                validate_metadata(s.metadata)
            except UserError as e:
                out[i] = RewardOutput(failure=f"bad GenEval metadata: {e}")
                continue
            todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            images = [to_pil(samples[i].image) for i in idx]  # type: ignore[arg-type]
            queries = [_classes(samples[i].metadata) for i in idx]
            found = self.backend.detect(images, queries, min(self.threshold_for(samples[i].metadata) for i in idx))
            for i, im, objs in zip(idx, images, found):
                out[i] = self.judge(im, objs, samples[i].metadata)
        return [o if o is not None else RewardOutput(failure="not scored") for o in out]

    def judge(self, image: Image.Image, objects: list[DetectedObject], metadata: dict[str, Any]) -> RewardOutput:
        """Selection, colours and rules for one image's raw detections."""
        kept = select(objects, self.threshold_for(metadata), self.max_objects, self.nms_threshold)
        dets = [Detection(o.label, o.box, o.score) for o in kept]
        source = {id(d): o for d, o in zip(dets, kept)}
        groups = group_detections(dets)
        need: dict[str, int] = {}
        for req in metadata.get("include", []):
            if "color" in req:
                need[req["class"]] = max(need.get(req["class"], 0), req["count"])
        for cls, k in need.items():
            top = groups.get(cls, [])[:k]
            for det, color in zip(top, self.colors.classify(image, [source[id(d)] for d in top], cls)):
                det.color = color
        res = evaluate(dets, metadata, classify_color=lambda d: self.colors.classify(image, [source[id(d)]], d.label)[0],
                       position_threshold=self.position_threshold, image_size=(image.width, image.height))
        score = float(res.correct) if self.binary else res.score
        return RewardOutput(score=score, components={"correct": float(res.correct), "strict_correct": float(res.strict_correct),
                                                     "partial": res.score},
                            reason="; ".join(res.reasons) or None)


def _classes(metadata: dict[str, Any]) -> list[str]:
    """Class names a prompt mentions, in order (OWLv2's text queries)."""
    names: list[str] = []
    for req in metadata.get("include", []) + metadata.get("exclude", []):
        if req["class"] not in names:
            names.append(req["class"])
    return names
