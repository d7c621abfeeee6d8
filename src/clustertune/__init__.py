"""clustertune: fine-tune LLMs from one GPU to several multi-GPU servers with DeepSpeed ZeRO."""

__version__ = "0.1.0"
