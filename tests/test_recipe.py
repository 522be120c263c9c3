"""The stage declarations (each stage's class) and the readers of them: pipeline order, lineage, plan, card."""

from pathlib import Path

import pyarrow as pa
import pytest

from m3t_gen.config import PipelineConfig, load_config
from m3t_gen.run.recipe import CIR_STAGES, SAMPLE_STAGES, enabled, lineage
from m3t_gen.rows import ROW_SCHEMA, new_row
from m3t_gen.stages.base import BOOKKEEPING, RunContext, Stage

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **sets) -> PipelineConfig:
    return load_config(ROOT / "pipelines" / "smoke.yaml", [f"{k}={v}" for k, v in sets.items()])


def test_every_declaration_is_complete_and_consistent():
    for stage in SAMPLE_STAGES + CIR_STAGES:
        schema = stage.row_schema or ROW_SCHEMA
        assert set(stage.writes) <= set(schema.names), stage.name
        assert BOOKKEEPING <= set(schema.names), stage.name
        assert stage.recipe_pass == ("cir" if stage in CIR_STAGES else "sample"), stage.name
        assert not stage.generates or stage.model_role == stage.name, stage.name
    cfg = load_config(ROOT / "pipelines" / "smoke.yaml")
    for stage in enabled(cfg):
        assert stage.section is None or stage.settings(cfg) is not None, stage.name
        # The same path reads the JSON dump a manifest keeps (the card and plan --from-run use that).
        assert (stage.settings(cfg.model_dump(mode="json", by_alias=True)) is None) == (stage.settings(cfg) is None)


def test_single_stage_run_names_no_captioner_and_plans_none():
    from m3t_gen.tools.plan import planned_stages

    both = load_config(ROOT / "pipelines" / "smoke.yaml")
    assert planned_stages(both) == ["caption", "embed", "dialogue", "reward", "judge", "modify", "triplet_reward",
                                    "triplet_judge"]
    single = load_config(ROOT / "pipelines" / "smoke.yaml",
                         ["recipe=m3t", "dialogue.source=image", "dialogue.model.model=tiny:qwen2_5_vl", "judge=null"])
    assert planned_stages(single) == ["embed", "dialogue", "reward"]
    templates, models = lineage(single)
    assert "caption" not in templates and "caption" not in models
    assert models == {"reward": "tiny:clip", "dialogue": "tiny:qwen2_5_vl"}
    assert templates == {"dialogue": "m3t_dialogue_image.j2"}
    # The judge's answerability template is part of the lineage exactly when it is used.
    judged = load_config(ROOT / "pipelines" / "smoke.yaml", ["recipe=m3t", "judge.answerability=false"])
    assert lineage(judged)[0] == {"caption": "caption_dense.j2", "dialogue": "m3t_dialogue.j2", "judge": "m3t_judge.j2"}
    assert lineage(both)[0]["judge.answer"] == "m3t_answer.j2" and lineage(both)[1]["judge"] == "tiny:qwen2_5_vl"


def test_a_stage_writing_an_undeclared_field_is_caught(monkeypatch):
    class Sloppy(Stage):
        name = "sloppy"
        writes = ("caption",)

        def process(self, rows):
            for r in rows:
                r["caption"] = "fine"
                r["turns"] = "[]"  # not declared

    monkeypatch.setenv("M3T_GEN_CHECK_ROWS", "1")
    cfg = load_config(ROOT / "pipelines" / "smoke.yaml")
    batch = pa.Table.from_pylist([new_row(key="k", shard="s")], schema=ROW_SCHEMA)
    with pytest.raises(AssertionError, match=r"stage sloppy set \['turns'\]"):
        Sloppy(RunContext(config=cfg, config_hash="x"))(batch)
