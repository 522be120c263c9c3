"""Turn types have one source (m3t_gen/turns.py): the schema files list exactly its types, and adding a type
changes nothing until a config asks for it."""

from __future__ import annotations

import json
from pathlib import Path

from m3t_gen.config import load_config
from m3t_gen.run.pipeline import result_hash
from m3t_gen.stages.judge import VERDICTS
from m3t_gen.tools.export import pretrain_order
from m3t_gen.turns import DEFAULT_MIX, TURN_TYPE_NAMES, TURN_TYPES, turn_plan

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def _enums(node, found):
    if isinstance(node, dict):
        if "enum" in node:
            found.append(node["enum"])
        for value in node.values():
            _enums(value, found)
    elif isinstance(node, list):
        for value in node:
            _enums(value, found)
    return found


def test_schema_files_list_exactly_the_turn_types_and_verdicts():
    for name in ("m3t_dialogue.schema.json", "m3t_sample.schema.json"):
        enums = _enums(json.loads((SCHEMAS / name).read_text()), [])
        types = [e for e in enums if "classification" in e]
        verdicts = [e for e in enums if "supported" in e]
        assert types and all(e == list(TURN_TYPE_NAMES) for e in types), name
        assert name == "m3t_dialogue.schema.json" or (verdicts and all(e == list(VERDICTS) for e in verdicts))


def test_a_new_turn_type_changes_no_default(smoke_yaml, monkeypatch):
    """Adding a type is one row in turns.py's table. The trap this guards: a default mix built from every row
    turned MuCo's 7-turn mix into 8 when a type was added, changing every default config hash and emptying
    MuCo's pretraining export. The module is re-run here with one more row, as a developer would add it."""
    import sys
    import types

    import m3t_gen.turns as turns

    source = Path(turns.__file__).read_text()
    row = ('    TurnType("vqa_counting", "a question asking how many of something are visible; the target is the "\n'
           '             "number", answer_check=True),\n')
    end = "\n)}\nTURN_TYPE_NAMES"
    assert source.count(end) == 1
    patched = types.ModuleType("turns_with_a_new_type")
    monkeypatch.setitem(sys.modules, patched.__name__, patched)
    exec(compile(source.replace(end, "\n" + row.rstrip("\n") + end), patched.__name__, "exec"), patched.__dict__)
    assert "vqa_counting" in patched.TURN_TYPES and len(patched.TURN_TYPES) == len(TURN_TYPES) + 1
    assert patched.DEFAULT_MIX == DEFAULT_MIX and sum(DEFAULT_MIX.values()) == 7

    cfg = load_config(smoke_yaml)
    monkeypatch.setattr(turns, "DEFAULT_MIX", patched.DEFAULT_MIX)
    assert result_hash(load_config(smoke_yaml)) == result_hash(cfg)
    plan = [{"type": t["type"], "query": "q", "target": "t"} for t in turn_plan(DEFAULT_MIX)]
    assert pretrain_order(plan) is not None  # MuCo's 7 pretraining slots are still filled
