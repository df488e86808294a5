"""Pure algorithm maths: advantages, policy losses, KL estimators (no I/O, no distributed code)."""
