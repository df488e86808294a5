"""r3_rl.blocks"""
