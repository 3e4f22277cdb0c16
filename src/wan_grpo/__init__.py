"""wan-grpo: GRPO reinforcement learning for Wan2.2 video models."""

__version__ = "0.1.0"
