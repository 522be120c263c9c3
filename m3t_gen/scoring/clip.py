"""CLIP / SigLIP embeddings through transformers (any HF-format checkpoint), L2-normalised numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from m3t_gen.models import resolve, torch_dtype


class ClipEmbedder:
    @classmethod
    def for_run(cls, reward_cfg: Any) -> "ClipEmbedder":
        """The run's CLIP (``reward`` section), on the GPU when the stage was given one."""
        return cls(reward_cfg.model, reward_cfg.dtype, "cuda" if reward_cfg.resources.num_gpus > 0 else "cpu")

    def __init__(self, model_ref: str, dtype: str = "auto", device: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        path = resolve(model_ref)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype(dtype, self.device)
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_text_tokens = int(getattr(text_cfg, "max_position_embeddings", 77))
        # SigLIP was trained with fixed-length padding; CLIP with padding to the longest text.
        self.text_padding = "max_length" if "siglip" in self.model.config.model_type else True
        self.dtype = dtype
        # CLIP's learned softmax temperature (SigLIP has one too); used by the self-retrieval probability.
        scale = getattr(self.model, "logit_scale", None)
        self.logit_scale = float(scale.exp().item()) if scale is not None else 100.0

    def embed_images(self, images: list[Any]) -> np.ndarray:
        import torch

        inputs = self.image_processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            feats = self.model.get_image_features(pixel_values=pixels)
        return _normalise(_as_tensor(feats))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        inputs = self.tokenizer(texts, padding=self.text_padding, truncation=True,
                                max_length=self.max_text_tokens, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            feats = self.model.get_text_features(**inputs)
        return _normalise(_as_tensor(feats))


def _as_tensor(feats: Any) -> Any:
    # Newer transformers may return a model output object instead of a bare tensor.
    return getattr(feats, "pooler_output", feats) if not hasattr(feats, "float") else feats


def _normalise(feats: Any) -> np.ndarray:
    arr = feats.float().cpu().numpy()
    return arr / np.clip(np.linalg.norm(arr, axis=-1, keepdims=True), 1e-12, None)
