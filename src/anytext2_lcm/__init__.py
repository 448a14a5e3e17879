"""anytext2-lcm: AnyText2 in modern PyTorch and its few-step LoRA students."""

__version__ = "0.1.0"
