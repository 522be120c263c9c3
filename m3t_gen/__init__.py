"""m3t-gen: synthetic multimodal training data (M3T dialogues, CIR triplets) on Ray + vLLM."""

__version__ = "0.1.0"
