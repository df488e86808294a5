"""Janus prompt building: recipe templates -> Janus chat turns -> token ids, and the CFG null stream.

Pure functions (no model), so the exact token layout of every stage is testable on its own.

Layout (the "deepseek" SFT format the Janus-Pro checkpoints were trained with, rendered through the
processor's chat template):

* text stages (reason, reflect): ``BOS [system "\\n\\n"] <|User|>: <content>\\n\\n<|Assistant|>:`` and the
  model continues with text up to ``<｜end▁of▁sentence｜>``.  The system prompt is the recipe's
  ``templates.system``, or the processor's default when it is configured to use one (as for the hub
  Janus-Pro checkpoints).
* image stages (generate, refine): the same user turn without system prompt (as in Janus-Pro's
  text-to-image training) followed by ``<begin_of_image>``; the model continues with VQ tokens.
* an input image (reflect, refine) is ``<begin_of_image>`` + N x ``<image_placeholder>`` +
  ``<end_of_image>``; the placeholders are replaced by SigLIP features (understanding path) in the
  forward pass.  ``{image}`` in a template places it; otherwise it comes first, as in Janus's own
  visual-question format.

Classifier-free guidance: the unconditional stream is the conditional prompt with every token that is
not BOS / an image boundary / an image placeholder replaced by the pad token, the same length and all
attended.  That is how Janus-Pro learnt unconditional generation (and what transformers'
``generate(generation_mode="image")`` does), so the recipe's ``generate_uncond`` template is not used.
For refine the previous image survives in the null stream: guidance pushes towards the prompt and the
edit instruction, with the image as common ground (R3's text-CFG for edits).
"""
from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np

from r3_rl.errors import UserError

PLACEHOLDER = re.compile(r"\{(prompt|plan|instruction|image)\}")
STAGE_FIELDS = {"reason": {"prompt"}, "generate": {"prompt", "plan"}, "reflect": {"prompt", "image"},
                "refine": {"prompt", "instruction", "image"}}
KNOWN_KEYS = set(STAGE_FIELDS) | {"system", "generate_uncond", "stop_phrase"}


def check_templates(templates: dict[str, str]) -> dict[str, str]:
    """Validate the recipe's templates for Janus; returns them unchanged."""
    unknown = sorted(set(templates) - KNOWN_KEYS)
    if unknown:
        raise UserError(f"templates.{unknown[0]}: unknown template for the Janus policy "
                        f"(valid: {', '.join(sorted(KNOWN_KEYS))})")
    for stage, fields in STAGE_FIELDS.items():
        if stage not in templates:
            raise UserError(f"templates.{stage}: missing; the Janus policy needs reason, generate, reflect, refine")
        for name in PLACEHOLDER.findall(templates[stage]):
            if name not in fields:
                raise UserError(f"templates.{stage}: placeholder {{{name}}} is not available in this stage "
                                f"(available: {', '.join('{' + f + '}' for f in sorted(fields))})")
        if templates[stage].count("{image}") > 1:
            raise UserError(f"templates.{stage}: {{image}} may appear at most once")
    if (templates.get("generate_uncond") or "").strip():
        raise UserError("templates.generate_uncond: the Janus policy builds the unconditional stream by padding the "
                        "prompt (as Janus-Pro was trained); set it to an empty string")
    return templates


def user_content(template: str, values: dict[str, str], with_image: bool) -> list[dict[str, Any]]:
    """A chat ``content`` list: the rendered text, with the image at ``{image}`` (or first)."""
    def fill(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)

    if not with_image:
        return [{"type": "text", "text": fill(template.replace("{image}", ""))}]
    before, _, after = template.partition("{image}") if "{image}" in template else ("", "", template)
    content: list[dict[str, Any]] = []
    if fill(before).strip():
        content.append({"type": "text", "text": fill(before)})
    content.append({"type": "image"})
    if fill(after).strip():
        content.append({"type": "text", "text": fill(after)})
    return content


def without_control_tokens(values: dict[str, str], control: tuple[str, ...]) -> dict[str, str]:
    """``values`` with every control-token string (``<image_placeholder>``, BOS/EOS, ...) removed.

    A prompt, plan or critique is text: a literal ``<image_placeholder>`` in it would otherwise tokenize as the
    special token and expand into an image block with no image behind it.  Removing the string is what
    ``decode_text(skip_special_tokens=True)`` already does to the model's own output.  ``control`` longest first,
    so a token containing another is removed whole.
    """
    def clean(text: str) -> str:
        for token in control:
            text = text.replace(token, "")
        return text

    return {k: clean(v) if isinstance(v, str) else v for k, v in values.items()}


def uncond_ids(ids: list[int], keep: set[int], pad_id: int) -> list[int]:
    """The CFG null stream: every id outside ``keep`` (BOS, image boundaries/placeholders) -> pad."""
    return [t if t in keep else pad_id for t in ids]


# --------------------------------------------------------------------------------------------
# Input images inside a Segment context (JSON): VQ tokens when the policy drew the image, else PNG
# --------------------------------------------------------------------------------------------

def image_ref(image: np.ndarray, image_tokens: list[int] | None) -> dict[str, Any]:
    """What a Segment stores to rebuild an input image exactly.

    The policy's own images are stored as their VQ tokens (compact; the pixels are re-decoded with the
    frozen VQ decoder); any other image as a lossless PNG (base64).
    """
    if image_tokens is not None:
        return {"tokens": [int(t) for t in image_tokens]}
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return {"png": base64.b64encode(buf.getvalue()).decode("ascii")}


def png_pixels(ref: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(ref["png"]))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
