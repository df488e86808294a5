"""CLIP: prompt-image alignment reward, and the encoder GenEval's colour classifier shares.

Two backends behind one small interface (:class:`ClipEncoder`): transformers' CLIP (default; any
``AutoModel`` with ``get_image_features`` / ``get_text_features``, loaded from a hub id or a local
folder) and open_clip when it imports (``backend: open_clip``, ``model: ViT-L-14``, ``pretrained:
openai`` or a checkpoint path) -- GenEval itself uses open_clip ViT-L-14/openai, whose weights are
the same as ``openai/clip-vit-large-patch14``.  Embeddings come back L2-normalised in float32 on the CPU.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
OPEN_CLIP_DEFAULT = "ViT-L-14"  # the same weights as open_clip names them (with pretrained "openai")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a torch device (use auto, cpu, cuda, cuda:1, ...)") from None


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


_LOADED: weakref.WeakValueDictionary[tuple[str, ...], torch.nn.Module] = weakref.WeakValueDictionary()


def shared_model(what: str, name: str, device: torch.device, dtype: torch.dtype,
                 load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """One copy per process of a frozen reward model: the trainer holds the task rewards and the eval rewards,
    and GenEval's detector and CLIP in both would be two copies on its GPU (about 2 GB each in fp32).  Held
    weakly: freed once no reward holds it (every holder's ``unload``).  ``load`` reads the weights (a failure is
    one line naming ``what`` and ``name``); the model is then moved to ``device``."""
    key = (what, name, str(device), str(dtype))
    model = _LOADED.get(key)
    if model is None:
        try:
            loaded = load()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, ... all mean "cannot load"
            raise load_error(what, name, e) from None
        model = _LOADED[key] = loaded.to(device).eval()
    return model


def load_error(what: str, name: str, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return UserError(f"{what}: cannot load {name!r} ({type(e).__name__}: {first}); give a hub id or a local folder "
                     f"written by save_pretrained")


class ClipEncoder:
    """L2-normalised CLIP embeddings of images and texts (transformers or open_clip)."""

    def __init__(self, model: str = DEFAULT_CLIP, backend: str = "transformers", pretrained: str | None = None,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32) -> None:
        if backend not in ("transformers", "open_clip"):
            raise UserError(f"clip backend {backend!r} is not one of transformers, open_clip")
        if pretrained is not None and backend != "open_clip":
            raise UserError("clip option 'pretrained' is for backend open_clip; transformers loads 'model'")
        if backend == "open_clip" and model == DEFAULT_CLIP:  # the transformers hub id is no open_clip name:
            model, pretrained = OPEN_CLIP_DEFAULT, pretrained or "openai"  # GenEval's ViT-L-14 / openai instead
        self.model_name, self.backend, self.pretrained = model, backend, pretrained
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size = max(1, int(batch_size))  # 0 would make range() step 0
        self.model: Any = None

    def load(self) -> None:
        if self.model is not None:
            return
        if self.backend == "open_clip":
            try:
                import open_clip  # type: ignore[import-not-found]
            except ImportError as e:
                raise UserError(f"clip backend open_clip does not import ({e}); pip install 'r3-rl[open-clip]' "
                                f"or use backend: transformers") from None
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    self.model_name, pretrained=self.pretrained, device=self.device)
                self._tokenize = open_clip.get_tokenizer(self.model_name)
            except Exception as e:  # noqa: BLE001
                raise load_error("clip (open_clip)", self.model_name, e) from None
            self._preprocess = preprocess
            self.model = model.to(dtype=self.dtype).eval()
            return
        from transformers import AutoModel, AutoProcessor

        def load() -> torch.nn.Module:
            model = AutoModel.from_pretrained(self.model_name, dtype=self.dtype)
            if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
                raise UserError(f"clip: {self.model_name!r} is a {type(model).__name__}, not a CLIP-style model")
            return model

        try:
            self.processor = AutoProcessor.from_pretrained(self.model_name)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, ... all mean "cannot load"
            raise load_error("clip", self.model_name, e) from None
        self.model = shared_model("clip", self.model_name, self.device, self.dtype, load)

    def unload(self) -> None:
        self.model = None

    def weights(self) -> list[str]:
        return [self.model_name] if self.backend == "transformers" else []  # open_clip has its own cache

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        self.load()
        outs = []
        for i in range(0, len(images), self.batch_size):
            batch = [to_pil(im) for im in images[i:i + self.batch_size]]
            if self.backend == "open_clip":
                px = torch.stack([self._preprocess(im) for im in batch]).to(self.device, self.dtype)
                feats = self.model.encode_image(px)
            else:
                px = self.processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                feats = _features(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
            outs.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.load()
        outs = []
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i:i + self.batch_size]
            if self.backend == "open_clip":
                feats = self.model.encode_text(self._tokenize(batch).to(self.device))
            else:
                tok = self.processor.tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
                feats = _features(self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)))
            outs.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)


class ClipReward(Reward):
    """``scale * cos(CLIP(image), CLIP(prompt))`` for the latest image; components: ``cosine``.

    Options: ``model`` (hub id or folder; open_clip architecture name with ``backend: open_clip``, where the
    default is ``ViT-L-14`` with ``pretrained: openai``, the same weights),
    ``backend`` (transformers | open_clip), ``pretrained`` (open_clip tag or checkpoint), ``device``
    (auto | cpu | cuda[:i]), ``dtype`` (float32 | float16 | bfloat16), ``batch_size``, ``scale``.
    """

    name = "clip"

    def __init__(self, model: str = DEFAULT_CLIP, backend: str = "transformers", pretrained: str | None = None,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32, scale: float = 1.0) -> None:
        self.encoder = ClipEncoder(model, backend, pretrained, device, dtype, batch_size)
        self.scale = float(scale)

    def setup(self) -> None:
        self.encoder.load()

    def teardown(self) -> None:
        self.encoder.unload()

    def weights(self) -> list[str]:
        return self.encoder.weights()

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        idx = [i for i, s in enumerate(samples) if s.image is not None]
        out = [RewardOutput(failure="no image to score") for _ in samples]
        if not idx:
            return out
        img = self.encoder.encode_images([to_pil(samples[i].image) for i in idx])  # type: ignore[arg-type]
        txt = self.encoder.encode_texts([samples[i].prompt for i in idx])
        cos = (img * txt).sum(-1).tolist()
        for i, c in zip(idx, cos):
            out[i] = RewardOutput(score=self.scale * c, components={"cosine": c})
        return out
