"""r3_rl.rollout"""
