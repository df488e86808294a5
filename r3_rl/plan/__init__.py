"""``r3-rl plan``: GPU memory of a recipe's processes before launch (shapes -> memory -> report -> render),
and its check against measurement on CPU (measure, validate)."""
