"""modify: an LLM writes N categorised modification texts for an image pair from the two dense captions
(CIR recipe; GPU actor pool), constrained to the JSON schema and validated always."""

from __future__ import annotations

from typing import Any

from m3t_gen.backends.base import GenerationResult
from m3t_gen.config import ModifySpec
from m3t_gen.config import PipelineConfig
from m3t_gen.generation import parse_json_answer
from m3t_gen.text.checks import degenerate_reason
from m3t_gen.text.schemas import bounded_text
from m3t_gen.stages.base import EXAMPLE_PAIR, OnPairs, RunContext, SchemaCheck
from m3t_gen.stages.estimate import CHAT_OVERHEAD, Estimating, Work, modify_output_bound
from m3t_gen.stages.generating import GeneratingStage


def template_fields(row: dict[str, Any], cfg: ModifySpec) -> dict[str, Any]:
    """The fields the modification template may use (checked by ``m3t-gen validate``)."""
    return {
        "reference_caption": row["ref_caption"],
        "target_caption": row["tgt_caption"],
        "similarity": row["similarity"],
        "n": cfg.n,
        "categories": [{"name": k, "instruction": v} for k, v in cfg.categories.items()],
    }


def load_pool_image(location: str) -> Any:
    """Read one pool image by seek from "<tar path>:<offset>:<size>" (no tar scan, no driver round trip)."""
    import io

    from PIL import Image

    from m3t_gen.storage.store import read_member

    path, offset, size = location.rsplit(":", 2)
    img = Image.open(io.BytesIO(read_member(path, int(offset), int(size))))
    img.load()
    return img.convert("RGB")


def decoding_schema(cfg: ModifySpec) -> dict[str, Any]:
    item = {"type": "object", "properties": {"category": {"enum": list(cfg.categories)},
                                             "text": bounded_text(cfg.max_text_chars)},
            "required": ["category", "text"], "additionalProperties": False}
    return {"type": "object",
            "properties": {"modifications": {"type": "array", "items": item, "minItems": cfg.n, "maxItems": cfg.n}},
            "required": ["modifications"], "additionalProperties": False}


class ModifyStage(OnPairs, GeneratingStage):
    name = "modify"
    section = "cir.modify"
    model_role = "modify"
    writes = ("modifications", "modify_attempts")

    @classmethod
    def images_per_request(cls, config: PipelineConfig) -> int:
        return 2 if config.cir.modify.source == "images" else 0

    @classmethod
    def example_prompts(cls, config: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
        return [("cir.modify.template", config.cir.modify.template, template_fields(EXAMPLE_PAIR, config.cir.modify))]

    @classmethod
    def schema_check(cls, config: PipelineConfig) -> SchemaCheck:
        spec = config.cir.modify
        probe = {"modifications": [{"category": next(iter(spec.categories)), "text": f"change {i}"}
                                   for i in range(spec.n)]}
        return SchemaCheck("cir.modify.schema", spec.schema_, probe, decoding_schema(spec), "well-formed modifications",
                           f"{spec.n} modifications in {len(spec.categories)} categories")

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        spec = est.cfg.cir.modify
        count = est.count(cls)
        text = est.rendered(spec.template, template_fields(EXAMPLE_PAIR, spec))
        prompt = (count(text) - count(EXAMPLE_PAIR["ref_caption"]) - count(EXAMPLE_PAIR["tgt_caption"])
                  + 2 * est.caption_out + CHAT_OVERHEAD)
        if spec.source == "images":
            prompt += 2 * est.vision(spec.model.model)
        pairs = est.cfg.cir.pairing.pairs_per_image
        bound = modify_output_bound(est.cfg)
        est.bounds.append(f"modify {bound} for {spec.n} texts per pair, "
                          f"{pairs} pair(s) per image (every image paired: an upper bound)")
        return Work(pairs, prompt, est.output(cls.name, bound), True, items="pairs")

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.decoding_schema = decoding_schema(self.cfg)

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return template_fields(row, self.cfg)

    image_fields = ("ref_image", "tgt_image")

    @classmethod
    def read_images(cls, config: PipelineConfig, row: dict[str, Any]) -> list[Any]:
        if config.cir.modify.source == "images":  # the MLLM sees the reference image first, then the target
            return [load_pool_image(row["ref_image"]), load_pool_image(row["tgt_image"])]
        return []

    def _parse(self, row: dict[str, Any], result: GenerationResult) -> tuple[list | None, str | None]:
        data, error = parse_json_answer(result, [self.file_schema, self.decoding_schema])
        if error:
            return None, error
        mods = data["modifications"]
        for mod in mods:
            bad = degenerate_reason(mod["text"])
            if bad:
                return None, f"{bad}_modification: {mod['text'][:120]!r}"
        if len({m["text"].strip().lower() for m in mods}) < len(mods):
            return None, "repeated_modification: two texts are the same"
        return mods, None

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row, mods, attempts in self.generate(rows, self._parse, json_schema=self.decoding_schema):
            row["modifications"] = [{"category": m["category"], "text": m["text"]} for m in mods]
            row["modify_attempts"] = attempts
