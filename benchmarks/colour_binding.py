"""Whether a tiny Blocks policy binds a colour to a shape: its refiner carrying out a recolour, its critic naming it.

Teacher-forced, in seconds, on a saved tiny policy (a run's ``warmstart/`` or ``final/``): for every single-colour
prompt "a photo of a C S" of a split and every other colour W, an image holding one W S (top-left cell),

* refiner: given "make the S C", the probability its first image token is a C S (``asked``) and that it
  leaves the W S as it was (``unchanged``);
* critic: after "<think> the S is W not C </think> make the S", the probability its next word is C (the prompt's
  colour; ``asks prompt colour``) and that C is its most likely colour word (``argmax``);
* critic, reading: after "<think> the S is" on that image, the probability its next word is W, the colour drawn
  (``reads W``), or C, the prompt's (``copies C``);
* critic, deciding: after "<think> the", the probability its next word is S -- the start of "the S is ... not C",
  a recolour, where a stop starts "the image matches" -- on the W S image (``recolour begun on W S``) and on a
  correct C S image (``on C S``).  A critic that reads W well but begins a recolour as often on C S as on W S
  decides before it looks: its verdict is taken at the second word, the colour only written after it (README:
  R3 synergy, session 29).  These two assume the plain critique (``warmstart.describe: none``); a describing
  critic begins "the image has ...", so its figures here mean nothing.

Why: refinement after RL in the demo misses on seeds whose warm start never learnt to bind colours (README: R3
synergy, session 26).  The same recipe draws warm starts that carry out recolours with probability 0.94 and
ones that do 0.19 (training prompts), and RL does not change it much; the per-tag eval shows it only after a full run.

    python benchmarks/colour_binding.py RUN/warmstart RUN/final [MORE_FOLDERS] [--recipe recipes/tiny_blocks.yaml]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser  # noqa: E402
from r3_rl.blocks.prompts import prompt_pool  # noqa: E402
from r3_rl.blocks.world import COLORS, token_of  # noqa: E402
from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.errors import EXIT_USAGE, UserError  # noqa: E402
from r3_rl.policy.base import ImageInput  # noqa: E402
from r3_rl.policy.tiny import TinyUnifiedPolicy  # noqa: E402
from r3_rl.policy.tiny_tokenizer import image_token  # noqa: E402


def next_token_probs(policy: TinyUnifiedPolicy, context: list[int]) -> torch.Tensor:
    """The policy's distribution over its next token after ``context`` (no classifier-free guidance)."""
    with torch.no_grad():
        return torch.softmax(policy.model(input_ids=torch.tensor([context])).logits[0, -1].float(), -1)


def recolour_cases(split: str) -> list[tuple[str, str, str, str]]:
    """(prompt, shape, prompt colour, drawn colour) for every single-colour prompt of ``split`` and other colour."""
    out = []
    for md in prompt_pool(split, "colors"):
        req = md["include"][0]
        out.extend((md["prompt"], req["class"], req["color"], w) for w in COLORS if w != req["color"])
    return out


def one_object_words(policy: TinyUnifiedPolicy, shape: str, colour: str) -> str:
    """The image words of a grid holding one ``colour`` ``shape`` in its top-left cell."""
    grid = np.zeros(policy.rows * policy.cols, dtype=np.int64)
    grid[0] = token_of(shape, colour)
    return policy.image_words(ImageInput(image=np.zeros(0), image_tokens=grid.tolist()))


def binding(policy: TinyUnifiedPolicy, split: str) -> dict[str, float]:
    """Mean teacher-forced probabilities over :func:`recolour_cases` (module docstring)."""
    colour_ids = [policy.encode(c)[0] for c in COLORS]
    rows: list[tuple[float, ...]] = []
    for prompt, shape, want, drawn in recolour_cases(split):
        words = one_object_words(policy, shape, drawn)
        p = next_token_probs(policy, policy.render("refine", prompt=prompt, image=words,
                                                  instruction=f"make the {shape} {want}"))
        asked = float(p[policy.encode(image_token(token_of(shape, want)))[0]])
        unchanged = float(p[policy.encode(image_token(token_of(shape, drawn)))[0]])
        reflect = policy.render("reflect", prompt=prompt, image=words)
        q = next_token_probs(policy, reflect + policy.encode(
            f"<think> the {shape} is {drawn} not {want} </think> make the {shape}"))[colour_ids]
        seen = next_token_probs(policy, reflect + policy.encode(f"<think> the {shape} is"))[colour_ids]
        shape_id = policy.encode(shape)[0]
        begun_wrong = float(next_token_probs(policy, reflect + policy.encode("<think> the"))[shape_id])
        right = policy.render("reflect", prompt=prompt, image=one_object_words(policy, shape, want))  # drawn right
        begun_right = float(next_token_probs(policy, right + policy.encode("<think> the"))[shape_id])
        rows.append((asked, unchanged, float(q[COLORS.index(want)]), float(int(q.argmax()) == COLORS.index(want)),
                     float(seen[COLORS.index(drawn)]), float(seen[COLORS.index(want)]), begun_wrong, begun_right))
    a = np.array(rows)
    names = ("refiner_asked", "refiner_unchanged", "critic_prompt_colour", "critic_argmax", "critic_reads_drawn",
             "critic_copies_prompt", "recolour_begun_wrong", "recolour_begun_right")
    return {"cases": float(len(a)), **{k: float(a[:, i].mean()) for i, k in enumerate(names)}}


def main() -> int:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="save_pretrained folders of tiny policies")
    ap.add_argument("--recipe", default="recipes/tiny_blocks.yaml", help="templates from here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:  # every folder loaded before any is measured: a bad one is one line and exit 2, as in `r3-rl`
        recipe = load_recipe(args.recipe)
        policies = [TinyUnifiedPolicy.from_pretrained(str(f), recipe.templates.model_dump()) for f in args.folders]
    except UserError as e:
        print(f"colour_binding: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for folder, policy in zip(args.folders, policies):
        print(folder)
        for split in ("train", "heldout"):
            b = binding(policy, split)
            print(f"  {split:8s} cases {int(b['cases']):3d}  refiner: asked {b['refiner_asked']:.3f} unchanged "
                  f"{b['refiner_unchanged']:.3f}  critic: asks prompt colour {b['critic_prompt_colour']:.3f} "
                  f"argmax {b['critic_argmax']:.2f}")
            print(f"  {'':8s} critic reading: reads W {b['critic_reads_drawn']:.3f} copies C "
                  f"{b['critic_copies_prompt']:.3f}  recolour begun on W S {b['recolour_begun_wrong']:.3f} "
                  f"on C S {b['recolour_begun_right']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
