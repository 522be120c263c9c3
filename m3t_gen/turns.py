"""The M3T turn types, in one table: what the writer is asked for, whether it writes the target, and which text
the reward scores against the image. Everything that treats one type differently reads it here.

MuCo's recipe: one classification, one retrieval, two holistic, two localized and one creative VQA pair per
image, all written in one call. The retrieval turn's target is the image's dense description: in the two-stage
recipe that is the caption the MLLM already wrote (the writer only asks the query); in the single-stage variant
the MLLM writes it in the same call, and it becomes the sample's caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TurnType:
    name: str
    instruction: str  # what the writer is asked for (the dialogue template lists it per turn)
    target_is_caption: bool = False  # the target is the dense description (not written by the two-stage writer)
    scored: Literal["target", "query and target"] = "query and target"  # what CLIP compares with the image
    answer_check: bool = False  # the judge's answerability check answers its query and compares with the target


TURN_TYPES: dict[str, TurnType] = {t.name: t for t in (
    TurnType("classification", "a question asking what the image mainly shows; the target is a label of one to "
             "three words", scored="target"),
    TurnType("retrieval", "a search query someone would type to find exactly this image; its target is the "
             "description", target_is_caption=True, scored="target"),
    TurnType("vqa_holistic", "a question about the scene as a whole; the target is its short answer", answer_check=True),
    TurnType("vqa_localized", "a question about one specific object, region or detail; the target is its short "
             "answer", answer_check=True),
    TurnType("vqa_creative", "an imaginative question still grounded in what is visible; the target is its answer", answer_check=True),
)}
TURN_TYPE_NAMES = tuple(TURN_TYPES)
# The published mix (MuCo, M3T: 7 pairs per image), written out: a type added to the table above changes no
# default, no config hash and no export until a config's dialogue.mix asks for it.
DEFAULT_MIX: dict[str, int] = {"classification": 1, "retrieval": 1, "vqa_holistic": 2, "vqa_localized": 2,
                               "vqa_creative": 1}
CAPTION_TURN = next(t.name for t in TURN_TYPES.values() if t.target_is_caption)


def writes_target(turn_type: str, single_stage: bool) -> bool:
    """Whether the writer model produces this turn's target (else it is the dense caption)."""
    return single_stage or not TURN_TYPES[turn_type].target_is_caption


def turn_plan(mix: dict[str, int]) -> list[dict[str, str]]:
    """The ordered turns a dialogue must have, with the instruction per turn (a template field)."""
    return [{"type": t, "instruction": TURN_TYPES[t].instruction} for t, n in mix.items() for _ in range(n)]


def scored_text(turn: dict[str, str]) -> str:
    """The text of a turn that the reward compares with the image."""
    if TURN_TYPES[turn["type"]].scored == "target":
        return turn["target"]
    return f"{turn['query']} {turn['target']}"
