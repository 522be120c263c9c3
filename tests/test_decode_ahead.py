"""Images decoded ahead of a generating stage (issue 27): a Ray Data task decodes them into the row's transient
``decoded`` field, the stage's actor only wraps the pixels. The model must see exactly what it saw when the actor
decoded them itself: same pixels, same requests, and with the real vLLM engine the same text, tokens and reasons."""

import io
import tarfile

import pytest
from PIL import Image

from m3t_gen.config import load_config
from m3t_gen.generation import open_image, pack_images, unpack_images
from m3t_gen.rows import OK, PAIR_SCHEMA, new_row, to_table
from m3t_gen.testing.scripted import ScriptedBackend

TURNS = [{"type": "classification", "query": "what is shown?", "target": "a boat"},
         {"type": "vqa_localized", "query": "how many boats are on the left?", "target": "3"}]


def _jpeg(i: int, size=(72, 48)) -> bytes:
    im = Image.new("RGB", size, (40 + 9 * i, 90, 200 - 7 * i))
    for x in range(0, size[0], 5):  # texture, so that the JPEG is not flat and decoders could differ
        im.putpixel((x, (x * 7 + i) % size[1]), (255, 255 - 11 * i, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _rows(n: int) -> list[dict]:
    rows = [new_row(key=f"s_{i:06d}", shard="s", source_key=str(i), image=_jpeg(i), width=72, height=48,
                    caption=f"a photo number {i}", turns=[dict(t) for t in TURNS]) for i in range(n)]
    rows.append(new_row(key="m_marker", shard="s", status="marker", shard_rows=n))
    return rows


def _pairs(tmp_path, n: int) -> list[dict]:
    path = tmp_path / "pool.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n + 1):
            data = _jpeg(i)
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        where = [f"{path}:{m.offset_data}:{m.size}" for m in tar.getmembers()]
    rows = []
    for i in range(n):
        row = dict.fromkeys(PAIR_SCHEMA.names)
        row.update(key=f"k{i}__k{i + 1}", shard="p", ref_key=f"k{i}", tgt_key=f"k{i + 1}", ref_caption="a boat",
                   tgt_caption="two boats", ref_image=where[i], tgt_image=where[i + 1], similarity=0.8, rank=1,
                   ref_index=i, tgt_index=i + 1, status=OK, timings="{}",
                   modifications=[{"category": "add", "text": f"add boat {i} {j}"} for j in range(3)])
        rows.append(row)
    return rows


def test_pack_unpack_gives_the_decoded_pixels_back():
    im = open_image({"image": _jpeg(3)})
    (back,) = unpack_images(pack_images([im]))
    assert back.mode == "RGB" and back.size == im.size and back.tobytes() == im.tobytes()
    with pytest.raises(ValueError, match="RGB"):
        pack_images([im.convert("L")])


def test_decode_ahead_fills_live_rows_and_leaves_what_fails_to_the_actor(smoke_yaml):
    from m3t_gen.stages.caption import CaptionStage

    cfg = load_config(smoke_yaml)
    rows = _rows(3)
    rows[1]["image"] = b"not a jpeg"  # the actor decodes it itself and fails as it always did
    out = CaptionStage.decode_ahead(to_table(rows), cfg).to_pylist()
    assert unpack_images(out[0]["decoded"])[0].tobytes() == open_image(rows[0]).tobytes()
    assert out[1]["decoded"] is None and out[2]["decoded"] is not None
    assert out[3]["decoded"] is None  # the marker row
    assert not CaptionStage.decodes_ahead(cfg)  # off by default
    assert CaptionStage.decodes_ahead(load_config(smoke_yaml, ["caption.resources.decode_cpus=0.1"]))


def test_stage_sends_the_same_requests_either_way_and_clears_the_field(smoke_yaml, monkeypatch):
    """Scripted backend: the judge (answerability on: two calls per row) gets the same messages, seeds and
    images whether the actor decodes or the decode task did; the field never leaves the stage."""
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.stages import generating, judge

    cfg = load_config(smoke_yaml, ["judge.answerability=true"])
    answers = ['{"verdicts":[{"verdict":"supported","score":4,"reason":"ok"},'
               '{"verdict":"supported","score":3,"reason":"ok"}]}', '{"answers":["three"]}']

    def run(table):
        backend = ScriptedBackend([answers[0]] * 2 + [answers[1]] * 2, output_tokens=5)  # verdicts, then answers
        monkeypatch.setattr(generating, "get_backend", lambda name: lambda spec: backend)
        out = judge.JudgeStage(make_context(cfg))(table)
        return [dict(r, timings=None) for r in out.to_pylist()], backend.requests

    table = to_table(_rows(2))
    plain, sent_plain = run(table)
    ahead, sent_ahead = run(judge.JudgeStage.decode_ahead(table, cfg))
    assert plain == ahead
    assert plain[0]["verdicts"] and all(r["decoded"] is None for r in ahead)
    assert len(sent_plain) == len(sent_ahead) == 4
    for a, b in zip(sent_plain, sent_ahead):
        assert a.seed == b.seed and a.json_schema == b.json_schema
        ca, cb = a.messages[0]["content"], b.messages[0]["content"]
        assert [p["type"] for p in ca] == [p["type"] for p in cb] and ca[-1] == cb[-1]
        assert ca[0]["image"].tobytes() == cb[0]["image"].tobytes() and ca[0]["image"].size == cb[0]["image"].size


def test_validate_counts_the_decode_tasks(smoke_yaml):
    from m3t_gen.config import ConfigError
    from m3t_gen.validate import _check_local_cpus

    cfg = load_config(smoke_yaml, ["caption.resources.decode_cpus=0.7"])
    with pytest.raises(ConfigError, match="caption decode"):
        _check_local_cpus(cfg)


@pytest.mark.slow
def test_real_engine_same_outputs_either_way(smoke_yaml, tmp_path):
    """The tiny Qwen2.5-VL of the smoke config in vLLM: caption, judge (answerability on) and the CIR judge (two
    images) over the same rows, the actor decoding vs the decode task: identical rows out (text, verdicts,
    attempts, tokens with image tokens, reasons)."""
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.stages.caption import CaptionStage
    from m3t_gen.stages.judge import JudgeStage, TripletJudgeStage

    cfg = load_config(smoke_yaml, ["judge.answerability=true"])
    for stage_cls, rows in ((CaptionStage, _rows(6)), (JudgeStage, _rows(6)),
                            (TripletJudgeStage, _pairs(tmp_path, 4))):
        table = to_table(rows, stage_cls.row_schema)
        ahead_in = stage_cls.decode_ahead(table, cfg)
        assert ahead_in.column("decoded").null_count < len(ahead_in)
        outs = []
        for t in (table, ahead_in):  # a fresh engine each: no cache of the first run serves the second
            stage = stage_cls(make_context(cfg))
            try:
                outs.append(stage(t).to_pylist())
            finally:
                stage.backend.close()
        plain, ahead = ([dict(r, timings=None) for r in out] for out in outs)
        assert plain == ahead, stage_cls.name
        live = [r for r in plain if r["status"] == OK]
        assert live and all('.image": ' in (r["tokens"] or "") for r in live), stage_cls.name
