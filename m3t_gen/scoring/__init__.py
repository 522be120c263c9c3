"""Scoring images against texts: the CLIP/SigLIP embedder and the reward measures."""
