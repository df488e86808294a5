"""r3_rl.tracking"""
