"""Policies: unified models that plan, draw, critique and refine.  See :mod:`r3_rl.policy.base`."""
