"""Evaluation: per-round GenEval-style accuracy (shipped as r3_rl.eval)."""
