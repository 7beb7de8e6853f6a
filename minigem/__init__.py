"""minigem: build, train, evaluate and serve multimodal vision-language models."""

__version__ = "0.1.0"
