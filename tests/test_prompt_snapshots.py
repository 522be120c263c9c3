"""Rendered-prompt snapshots, one per template: a change to a prompt shows up as a reviewed diff.
Refresh after an intended change with: UPDATE_SNAPSHOTS=1 pytest tests/test_prompt_snapshots.py"""

import os
from pathlib import Path

import pytest

from m3t_gen.config import DEFAULT_CIR_CATEGORIES, DEFAULT_MIX, ModifySpec
from m3t_gen.stages import caption, dialogue, judge, modify
from m3t_gen.text.templates import load_template
from m3t_gen.stages.base import EXAMPLE_PAIR, EXAMPLE_ROW

SNAPSHOTS = Path(__file__).parent / "snapshots"
MODIFY = ModifySpec.model_construct(n=5, categories=dict(DEFAULT_CIR_CATEGORIES), max_text_chars=200)
JUDGED = dict(EXAMPLE_ROW, turns=[
    {"type": "classification", "query": "What does the image mainly show?", "target": "a cat"},
    {"type": "retrieval", "query": "grey cat on a red sofa", "target": EXAMPLE_ROW["caption"]},
    {"type": "vqa_localized", "query": "What stands on the left?", "target": "a lamp"},
])
JUDGED_PAIR = dict(EXAMPLE_PAIR, modifications=[{"category": "color", "text": "make the car blue"},
                                                {"category": "weather", "text": "cover the street in snow"}])
CASES = {
    "caption_dense.j2": caption.template_fields(EXAMPLE_ROW),
    "m3t_dialogue.j2": dialogue.template_fields(EXAMPLE_ROW, DEFAULT_MIX),
    "m3t_dialogue_image.j2": dialogue.template_fields(dict(EXAMPLE_ROW, caption=None), DEFAULT_MIX),
    "cir_modifications.j2": modify.template_fields(EXAMPLE_PAIR, MODIFY),
    "cir_modifications_images.j2": modify.template_fields(EXAMPLE_PAIR, MODIFY),
    "m3t_judge.j2": judge.template_fields(JUDGED),
    "m3t_answer.j2": judge.answer_fields(JUDGED),
    "cir_judge.j2": judge.triplet_template_fields(JUDGED_PAIR),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_prompt_matches_snapshot(name):
    rendered = load_template(name).render(**CASES[name]) + "\n"
    snap = SNAPSHOTS / (name.replace(".j2", ".txt"))
    if os.environ.get("UPDATE_SNAPSHOTS"):
        snap.write_text(rendered)
    assert snap.exists(), f"{snap.name} is missing: write it with UPDATE_SNAPSHOTS=1 and review it"
    assert rendered == snap.read_text(), f"{name} changed; review and refresh with UPDATE_SNAPSHOTS=1"


def test_every_bundled_template_has_a_snapshot():
    bundled = {p.name for p in (Path(__file__).resolve().parents[1] / "prompts").glob("*.j2")}
    assert bundled == set(CASES)
