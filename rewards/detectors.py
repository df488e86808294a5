"""Object detector backends for GenEval-style rewards: Mask2Former (GenEval's) and OWLv2, via transformers.

A backend turns images into :class:`DetectedObject` s (GenEval class name, pixel box, confidence,
instance mask when the detector has one).  Selection as GenEval does it -- confidence threshold,
at most ``max_objects`` per class, optional NMS -- is the pure function :func:`select`.

Mask2Former post-processing is :func:`mask2former_instances`, written after mmdetection's
(which GenEval runs): top-k (query, class) pairs by class probability, score = class probability x
mean mask probability inside the mask, masks upsampled to the padded input, cropped to the image and
resized to the original size, boxes from mask extents.  transformers' own post-processor resizes
masks without removing padding, which shifts boxes on non-square inputs, so we do not use it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.clip import load_error, resolve_device, resolve_dtype, shared_model

# COCO / detector label spellings -> GenEval class names (GenEval's object_names.txt).
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
    "tv monitor": "tv", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
    "pottedplant": "potted plant", "diningtable": "dining table", "cellphone": "cell phone",
    "hair dryer": "hair drier", "doughnut": "donut", "sports_ball": "sports ball",
}


@dataclass
class DetectedObject:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    score: float
    mask: np.ndarray | None = None  # HxW bool, when the detector segments


def normalize_label(label: str, label_map: dict[str, str] | None = None) -> str:
    key = " ".join(label.replace("_", " ").replace("-", " ").lower().split())
    if label_map and (label in label_map or key in label_map):
        return label_map.get(label, label_map.get(key, key))
    return LABEL_ALIASES.get(key, key)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU with GenEval's inclusive-pixel convention (+1 on each side length)."""
    def area(x: tuple[float, ...]) -> float:
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select(objects: list[DetectedObject], threshold: float, max_objects: int = 16,
           nms_threshold: float = 1.0) -> list[DetectedObject]:
    """GenEval's selection per class: score > threshold, top ``max_objects``, then greedy NMS.

    ``nms_threshold >= 1`` disables NMS (GenEval's default); otherwise a box is dropped when its IoU
    with an already kept box of the same class is ``>= nms_threshold``.
    """
    by_label: dict[str, list[DetectedObject]] = {}
    for o in objects:
        by_label.setdefault(o.label, []).append(o)
    out: list[DetectedObject] = []
    for label in by_label:
        ranked = sorted((o for o in by_label[label] if o.score > threshold), key=lambda o: -o.score)[:max_objects]
        kept: list[DetectedObject] = []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if nms_threshold < 1:
                ranked = [o for o in ranked if box_iou(best.box, o.box) < nms_threshold]
        out.extend(kept)
    return out


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a binary mask, exclusive right/bottom edge (mmdetection's mask2bbox); zeros if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def mask2former_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_hw: tuple[int, int],
                          valid_hw: tuple[int, int], out_hw: tuple[int, int], top_k: int = 100,
                          min_score: float = 0.0) -> list[tuple[int, float, np.ndarray]]:
    """(label id, score, HxW bool mask) of one image's instances with score > ``min_score``.

    ``class_logits``: [Q, C+1] (last = no object); ``mask_logits``: [Q, h, w] at 1/4 of the padded
    input ``padded_hw``; ``valid_hw``: the resized image inside the padding; ``out_hw``: original size.
    Pairs whose class probability is already <= ``min_score`` are skipped before upsampling: the mask
    factor is <= 1, so they could not pass (same result as mmdetection, far less memory).
    """
    num_q, num_c = class_logits.shape[0], class_logits.shape[1] - 1
    probs = torch.softmax(class_logits.float(), dim=-1)[:, :-1]
    k = min(top_k, num_q * num_c)
    cls_scores, flat_idx = probs.flatten().topk(k)
    keep = cls_scores > min_score
    cls_scores, flat_idx = cls_scores[keep], flat_idx[keep]
    if len(flat_idx) == 0:
        return []
    labels, queries = flat_idx % num_c, flat_idx // num_c
    m = mask_logits[queries].float()[None]
    m = torch.nn.functional.interpolate(m, size=padded_hw, mode="bilinear", align_corners=False)
    m = m[:, :, :valid_hw[0], :valid_hw[1]]
    m = torch.nn.functional.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)[0]
    binary = m > 0
    mask_scores = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = cls_scores * mask_scores
    return [(int(lbl), float(s), b.numpy()) for lbl, s, b in zip(labels, scores, binary.cpu()) if s > min_score]


class Mask2FormerBackend:
    """COCO instance segmentation with ``Mask2FormerForUniversalSegmentation`` (closed vocabulary)."""

    default_model = "facebook/mask2former-swin-small-coco-instance"

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "float32", top_k: int = 100,
                 label_map: dict[str, str] | None = None) -> None:
        self.model_name = model or self.default_model
        self.device, self.dtype, self.top_k, self.label_map = resolve_device(device), resolve_dtype(dtype), top_k, label_map
        self.model: Any = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        try:
            self.processor = AutoImageProcessor.from_pretrained(self.model_name)
        except Exception as e:  # noqa: BLE001
            raise load_error("geneval (mask2former)", self.model_name, e) from None
        self.model = shared_model("geneval (mask2former)", self.model_name, self.device, self.dtype, lambda: (
            Mask2FormerForUniversalSegmentation.from_pretrained(self.model_name, dtype=self.dtype)))
        self.labels = {int(i): normalize_label(n, self.label_map) for i, n in self.model.config.id2label.items()}

    def unload(self) -> None:
        self.model = None

    @torch.no_grad()
    def detect(self, images: list[Image.Image], queries: list[list[str]], min_score: float) -> list[list[DetectedObject]]:
        self.load()
        inputs = self.processor(images=images, return_tensors="pt")
        px = inputs["pixel_values"].to(self.device, self.dtype)
        pmask = inputs.get("pixel_mask")
        out = self.model(pixel_values=px, pixel_mask=None if pmask is None else pmask.to(self.device))
        padded_hw = (px.shape[-2], px.shape[-1])
        results = []
        for i, im in enumerate(images):
            if pmask is not None:
                valid_hw = (int(pmask[i].any(dim=1).sum()), int(pmask[i].any(dim=0).sum()))
            else:
                valid_hw = padded_hw
            inst = mask2former_instances(out.class_queries_logits[i].cpu(), out.masks_queries_logits[i].cpu(),
                                         padded_hw, valid_hw, (im.height, im.width), self.top_k, min_score)
            results.append([DetectedObject(self.labels.get(lbl, str(lbl)), mask_to_box(m), s, m) for lbl, s, m in inst])
        return results


class Owlv2Backend:
    """Open-vocabulary detection with ``Owlv2ForObjectDetection``: queries are the prompt's class names."""

    default_model = "google/owlv2-base-patch16-ensemble"

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "float32",
                 query_template: str = "a photo of a {}") -> None:
        if "{}" not in query_template:
            raise UserError(f"geneval option query_template must contain '{{}}' for the class name, got {query_template!r}")
        self.model_name = model or self.default_model
        self.device, self.dtype, self.query_template = resolve_device(device), resolve_dtype(dtype), query_template
        self.model: Any = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        try:
            self.processor = AutoProcessor.from_pretrained(self.model_name)
        except Exception as e:  # noqa: BLE001
            raise load_error("geneval (owlv2)", self.model_name, e) from None
        self.model = shared_model("geneval (owlv2)", self.model_name, self.device, self.dtype, lambda: (
            Owlv2ForObjectDetection.from_pretrained(self.model_name, dtype=self.dtype)))

    def unload(self) -> None:
        self.model = None

    def _inputs(self, images: list[Image.Image], texts: list[list[str]]) -> Any:
        try:
            return self.processor(text=texts, images=images, return_tensors="pt")
        except ImportError as e:
            # transformers' OWLv2 resize needs scipy (PIL backend) or torchvision; without them pad to a
            # square bottom-right (as OWLv2 does) and resize with PIL, close to the official antialiased resize.
            warnings.warn(f"owlv2 preprocessing falls back to PIL resizing ({str(e).strip().splitlines()[0]})",
                          stacklevel=2)
            size = self.processor.image_processor.size
            hw = (size["height"], size["width"])
            squared = []
            for im in images:
                side = max(im.width, im.height)
                canvas = Image.new("RGB", (side, side), (128, 128, 128))
                canvas.paste(im, (0, 0))
                squared.append(canvas.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
            return self.processor(text=texts, images=squared, return_tensors="pt", do_resize=False, do_pad=False)

    @torch.no_grad()
    def detect(self, images: list[Image.Image], queries: list[list[str]], min_score: float) -> list[list[DetectedObject]]:
        self.load()
        texts = [[self.query_template.format(q) for q in qs] or [" "] for qs in queries]
        inputs = self._inputs(images, texts)
        inputs = {k: (v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device)) for k, v in inputs.items()}
        out = self.model(**inputs)
        post = self.processor.post_process_grounded_object_detection(
            out, threshold=min_score, target_sizes=[(im.height, im.width) for im in images])
        results = []
        for im, qs, res in zip(images, queries, post):
            objs = []
            for box, score, lbl in zip(res["boxes"].tolist(), res["scores"].tolist(), res["labels"].tolist()):
                if lbl < len(qs):  # padded query slots (batches with fewer classes) are not objects
                    x0, y0, x1, y1 = (min(max(v, 0.0), lim) for v, lim in zip(box, (im.width, im.height) * 2))
                    objs.append(DetectedObject(qs[lbl], (x0, y0, x1, y1), float(score)))
            results.append(objs)
        return results
