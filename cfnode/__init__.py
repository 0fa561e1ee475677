"""cfnode: peer-to-peer pipeline training of LLaMA models with checkpoint-free stage recovery."""

__version__ = "0.1.0"
