"""r3-rl: RL fine-tuning of unified multimodal models with Reason-Reflect-Refine and Tree-RL."""
__version__ = "0.1.0"
