"""r3_rl.learner"""
