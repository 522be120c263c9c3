"""Issue 25, a hostile probe of the commands: operator mistakes that destroyed data (refilter's working folders,
inspect / export targets inside a run, CLI paths turned into YAML) and configs or templates that ended in a
traceback or ate the machine (alias cycles and bombs, duplicate keys, include, unbounded range). Each is refused
in one line with exit code 2, the files it must not touch unchanged; the legitimate uses next to them still work.
No model is loaded and Ray is not started: the run output is built by the real writer from hand-made rows."""

import io
import json
import os
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from m3t_gen.cli import main
from m3t_gen.config import ConfigError, load_config
from m3t_gen.rows import MARKER, new_row

from conftest import one_line_exit_2, small_pipeline


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (shade, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def _finished_run(root: Path) -> Path:
    """A finished output of the small-shard config, written by the real OutputWriter from hand-made scored rows:
    one shard of 3 samples, the third filtered out (2 of its 3 turns below min_turn_score, min_turns 3), and one
    CIR triplet between the two kept ones."""
    from m3t_gen.run.artefacts import ShardStats
    from m3t_gen.run.pipeline import make_context, summarize, write_owner_file
    from m3t_gen.run.writer import OutputWriter
    from m3t_gen.stages.filter import apply_filter

    cfg = load_config(small_pipeline(root))
    ctx = make_context(cfg)
    out = root / "run"
    out.mkdir()
    write_owner_file(out, cfg)
    writer = OutputWriter(out, ctx, {"s": "/in/s.tar"})
    for i, scores in enumerate(([0.3, 0.3, 0.3], [0.3, 0.2, 0.3], [0.3, -0.5, -0.5])):
        turns = [{"type": "vqa_holistic", "query": f"q{j}", "target": f"t{j}"} for j in range(3)]
        row = new_row(key=f"s_{i:06d}", shard="s", source_key=str(i), turns=turns, image=_jpeg(40 * i),
                      scores={"caption": 0.3, "turns": scores}, caption=f"caption {i}", width=32, height=24,
                      image_sha256="0" * 64, reencoded=False, caption_attempts=1, dialogue_attempts=1)
        apply_filter(row, cfg.filter)
        writer.consume([row])
    writer.consume([new_row(key="s__end", shard="s", status=MARKER, shard_rows=3)])
    assert not writer.incomplete()
    (out / "triplets").mkdir()
    (out / "triplets" / "part-00000.jsonl").write_text(json.dumps({
        "id": "s_000000__s_000001", "image": "s_000000", "target_image": "s_000001",
        "modifications": [{"category": "attribute", "text": "make it red", "score": 0.3}]}) + "\n")
    totals, stages = summarize([ShardStats.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))])
    (out / "manifest.json").write_text(json.dumps({
        "name": cfg.name, "recipe": cfg.recipe, "config": cfg.model_dump(mode="json", by_alias=True),
        "config_hash": ctx.config_hash, "templates": ctx.template_hashes, "models": ctx.model_names,
        "totals": totals.to_json(), "stages": [s.to_json() for s in stages]}, indent=1))
    return out


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (and ``folder`` itself if a file): its bytes and mtime."""
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def _ok(args: list) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _kept(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "index").column("key").to_pylist())


# ------------------------------------------------------------------------------------------- 1. refilter
def test_refilter_works_inside_its_output_only_and_never_touches_its_neighbours(tmp_path):
    out = _finished_run(tmp_path)
    # What the old refilter deleted (OUT.refilter.tmp) or tripped over on every try (OUT.old.tmp): not its own.
    for name in ("run.refilter.tmp", "run.old.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("the operator's")
    neighbours = {name: _snapshot(tmp_path / name) for name in ("run.refilter.tmp", "run.old.tmp", "pipeline.yaml")}
    beside = sorted(p.name for p in tmp_path.iterdir())
    assert _kept(out) == ["s_000000", "s_000001"]
    _ok(["refilter", out, "--set", "filter.min_turns=1"])
    assert _kept(out) == ["s_000000", "s_000001", "s_000002"]  # the filtered sample revived
    assert {name: _snapshot(tmp_path / name) for name in neighbours} == neighbours
    assert sorted(p.name for p in tmp_path.iterdir()) == beside  # nothing staged beside the output
    assert not (out / ".m3t-gen-refilter").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["kept"] == 3 and manifest["refilters"][0]["set"] == ["filter.min_turns=1"]
    assert (out / "triplets" / "part-00000.jsonl").is_file()  # the CIR results stay where they are


@pytest.mark.parametrize("stranger", ["folder", "file", "link"])
def test_refilter_refuses_a_working_folder_it_did_not_make(tmp_path, stranger):
    out = _finished_run(tmp_path)
    work = out / ".m3t-gen-refilter"
    if stranger == "folder":
        work.mkdir()
        (work / "notes.txt").write_text("the operator's")
    elif stranger == "file":
        work.write_text("the operator's")
    else:
        (tmp_path / "elsewhere").mkdir()
        work.symlink_to(tmp_path / "elsewhere")
    before = _snapshot(out)
    one_line_exit_2(["refilter", out, "--set", "filter.min_turns=1"], f"{work}: exists and m3t-gen did not make it")
    assert _snapshot(out) == before
    assert os.path.lexists(work)


@pytest.mark.parametrize("killed_at", ["build", "swap"])
def test_refilter_killed_half_way_is_undone_by_the_next_one(tmp_path, monkeypatch, killed_at):
    """A refilter killed while building leaves its working folder; killed while swapping, half the output is new.
    The next refilter finds its own marked leftover, puts the run back as it was, and does the work."""
    from m3t_gen.tools import refilter as refilter_module

    out = _finished_run(tmp_path)
    before = _snapshot(out)
    real_replace = os.replace

    def killed(src, dst):
        if killed_at == "swap" and Path(src) == out / ".m3t-gen-refilter" / "new" / "index":
            raise KeyboardInterrupt("killed")  # shards and filtered already swapped in, index's old one out
        return real_replace(src, dst)

    if killed_at == "build":
        monkeypatch.setattr(refilter_module, "write_owner_file", lambda *a: (_ for _ in ()).throw(
            KeyboardInterrupt("killed")))
    monkeypatch.setattr(refilter_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        refilter_module.refilter(out, ["filter.min_turns=1"])
    monkeypatch.undo()
    assert (out / ".m3t-gen-refilter" / ".m3t-gen").is_file()  # its own leftover, marked
    refilter_module._recover(out)  # what the next refilter does first (under the lock)
    after = {k: v for k, v in _snapshot(out).items() if not k.endswith(".m3t-gen.lock")}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # the run as it was
    _ok(["refilter", out, "--set", "filter.min_turns=1"])
    assert _kept(out) == ["s_000000", "s_000001", "s_000002"]
    assert not (out / ".m3t-gen-refilter").exists()


def test_refilter_killed_before_marking_its_folder_leaves_nothing_to_refuse(tmp_path):
    out = _finished_run(tmp_path)
    (out / ".m3t-gen-refilter").mkdir()  # made, not yet marked: empty, so nothing is lost by removing it
    _ok(["refilter", out, "--set", "filter.min_turns=1"])
    assert _kept(out) == ["s_000000", "s_000001", "s_000002"]


# ------------------------------------------------------------------------------- 2, 3. inspect and export
def test_inspect_and_export_refuse_targets_inside_a_run_output(tmp_path):
    out = _finished_run(tmp_path)
    other = tmp_path / "other"  # another run output (a copy): not the one being read, still a run's files
    other.mkdir()
    (other / "manifest.json").write_text((out / "manifest.json").read_text())
    (tmp_path / "into-run").symlink_to(out)  # a link does not hide where the path lands
    before = _snapshot(out), _snapshot(other)
    for target in (out / "manifest.json", out / "card" / "page.html", other / "page.html",
                   tmp_path / "into-run" / "page.html"):
        one_line_exit_2(["inspect", out, "--html", target], "inside the m3t-gen run output")
    for fmt, target in (("mtcir", out / "triplets" / "part-00000.jsonl"), ("mtcir", out), ("muco", out),
                        ("cirr", out / "exports"), ("muco", other / "muco"),
                        ("muco", tmp_path / "into-run" / "muco")):
        one_line_exit_2(["export", out, "--format", fmt, "--to", target], "inside the m3t-gen run output")
    assert (_snapshot(out), _snapshot(other)) == before
    assert (out / "manifest.json").read_text() == before[0][str(out / "manifest.json")][0].decode()
    _ok(["card", out])  # the manifest is intact: the card still reads it


def test_export_refuses_a_folder_it_did_not_make_and_rewrites_its_own(tmp_path):
    out = _finished_run(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text("the operator's own training data\n")
    (mine / "images").mkdir()
    before = _snapshot(mine)
    one_line_exit_2(["export", out, "--format", "mtcir", "--to", mine], "a non-empty folder that m3t-gen did not "
                                                                        "export into")
    one_line_exit_2(["export", out, "--format", "mtcir", "--to", mine / "train.jsonl"], "did not export into")
    assert _snapshot(mine) == before
    # A new folder, an empty one, and m3t-gen's own export of the same format again: written.
    (tmp_path / "empty").mkdir()
    for to in (tmp_path / "cir", tmp_path / "cir", tmp_path / "empty" / "t.jsonl"):
        assert "wrote      1 rows" in _ok(["export", out, "--format", "mtcir", "--to", to])
    assert json.loads((tmp_path / "cir" / ".m3t-gen-export").read_text())["format"] == "mtcir"
    # Another format over it would mix two layouts: refused.
    one_line_exit_2(["export", out, "--format", "cirr", "--to", tmp_path / "cir"], "holds an m3t-gen mtcir export")
    _ok(["export", out, "--format", "muco", "--to", tmp_path / "muco"])


def test_inspect_overwrites_only_its_own_page(tmp_path):
    out = _finished_run(tmp_path)
    notes = tmp_path / "notes.html"
    notes.write_text("<p>the operator's notes</p>")
    before = _snapshot(notes)
    one_line_exit_2(["inspect", out, "--html", notes], "exists and is not a page m3t-gen inspect wrote")
    assert _snapshot(notes) == before
    page = tmp_path / "page.html"
    for _ in range(2):  # written, then its own earlier page replaced
        _ok(["inspect", out, "--html", page])
    assert "s_000000" in page.read_text()


# ------------------------------------------------------------------------------------- 4. CLI paths
QUOTED = "it's a \"quoted\" folder"


def test_cli_paths_with_both_quotes_arrive_as_they_are(tmp_path, monkeypatch):
    """A path holding ' and " once went through repr() into YAML, failed to parse and was used raw: the run wrote
    to a different, relative folder under the working directory."""
    import m3t_gen.run.pipeline

    monkeypatch.chdir(tmp_path)
    seen = {}

    def stop(cfg, out, **_):  # stands in for the run: what reached it is what is under test
        seen.update(paths=cfg.input.paths, dir=cfg.output.dir, limit=cfg.limit)
        raise ConfigError("stopped before the run")

    monkeypatch.setattr(m3t_gen.run.pipeline, "run_pipeline", stop)
    pipeline = small_pipeline(tmp_path)
    one_line_exit_2(["run", pipeline, "--input", tmp_path / QUOTED / "*.tar", "--output", tmp_path / QUOTED,
                     "--limit", "2"], "stopped before the run")
    assert seen == {"paths": [str(tmp_path / QUOTED / "*.tar")], "dir": str(tmp_path / QUOTED), "limit": 2}
    monkeypatch.undo()
    # The real run: a non-empty folder of that name is refused by its exact name, and nothing lands elsewhere.
    os.chdir(tmp_path)
    (tmp_path / QUOTED).mkdir()
    (tmp_path / QUOTED / "mine.txt").write_text("the operator's")
    beside = sorted(p.name for p in tmp_path.iterdir())
    one_line_exit_2(["run", pipeline, "--output", tmp_path / QUOTED], f"output.dir: {tmp_path / QUOTED} is a "
                                                                      "non-empty folder that m3t-gen did not write")
    assert sorted(p.name for p in tmp_path.iterdir()) == beside


# ------------------------------------------------------------------------------- 5, 6. YAML
def _with_engine_args(tmp_path: Path, lines: str) -> Path:
    """The small-shard pipeline with ``lines`` added to caption.model.options.engine_args."""
    path = small_pipeline(tmp_path)
    text = path.read_text()
    m = re.search(r"^( *)kv_cache_memory_bytes: \d+\n", text, re.M)  # the first is caption's (keys sorted)
    path.write_text(text[:m.end()] + "".join(f"{m.group(1)}{line}\n" for line in lines.splitlines())
                    + text[m.end():])
    return path


def test_recursive_alias_is_refused_at_validate_and_run(tmp_path):
    pipeline = _with_engine_args(tmp_path, "loop: &loop [1, *loop]")
    for command in ("validate", "run"):
        one_line_exit_2([command, pipeline], "caption.model.options.engine_args.loop[1]: an alias inside its own "
                                             "anchor")


def test_alias_bomb_is_refused_in_bounded_time(tmp_path):
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10^10 values
    pipeline = _with_engine_args(tmp_path, "\n".join(levels))
    started = time.perf_counter()
    for command in ("validate", "run"):
        one_line_exit_2([command, pipeline], "caption.model.options.engine_args.l")
    assert time.perf_counter() - started < 10


def test_a_key_given_twice_is_refused_with_its_path_and_line(tmp_path):
    pipeline = _with_engine_args(tmp_path, "kv_cache_memory_bytes: 1")
    line = next(n for n, text in enumerate(pipeline.read_text().splitlines(), 1) if text.strip().endswith(": 1"))
    one_line_exit_2(["validate", pipeline], f"caption.model.options.engine_args.kv_cache_memory_bytes: duplicate "
                                            f"key at line {line}")
    top = tmp_path / "top.yaml"
    top.write_text(small_pipeline(tmp_path).read_text() + "seed: 3\n")
    one_line_exit_2(["validate", top], f"{top}: seed: duplicate key")
    one_line_exit_2(["validate", small_pipeline(tmp_path), "--set", "caption.model.options={a: 1, a: 2}"],
                    "--set caption.model.options: a: duplicate key")


def test_aliases_and_merge_keys_that_are_not_hostile_still_load(tmp_path):
    """One engine_args block shared by two stages (an anchor and an alias), and a merge whose explicit key
    overrides the merged one: ordinary YAML, accepted as before."""
    text = small_pipeline(tmp_path).read_text()
    blocks = list(re.finditer(r"engine_args:\n( *)kv_cache_memory_bytes: 134217728\n", text))
    first, last = blocks[0], blocks[-1]  # caption's and judge's (keys sorted)
    text = (text[:first.start()] + "engine_args: &kv\n" + text[first.start() + len("engine_args:\n"):last.start()]
            + "engine_args: *kv\n" + text[last.end():])
    text = re.sub(r"^filter:\n(?:  .*\n)+", "filter:\n  <<: {min_turns: 1, drop_contradicted: false}\n"
                  "  min_turns: 2\n", text, count=1, flags=re.M)
    path = tmp_path / "shared.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.filter.min_turns == 2 and cfg.filter.drop_contradicted is False
    assert cfg.judge.model.options["engine_args"] == {"kv_cache_memory_bytes": 134217728}
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 0


# ------------------------------------------------------------------------------------- 7. templates
@pytest.mark.parametrize("source,fragment", [
    ("{% include 'secret.txt' %}Describe.", "line 1: {% include %} is not supported"),
    ("Describe.\n{% import 'secret.txt' as s %}", "line 2: {% import %} is not supported"),
    ("{% extends 'secret.txt' %}", "line 1: {% extends %} is not supported"),
    ("Describe.{% for i in range(10**9) %}x{% endfor %}", "line 1: range() of 1000000000 items, more than 10000"),
    ("Describe {{ 10 ** (10 ** 9) }}.", "line 1: 10 ** 1000000000: an exponent over 1000"),
    ("Describe {{ 'x' * 10 ** 9 }}.", "line 1: 1 items repeated 1000000000 times"),
    ("Describe {{ '%0999999999d' % 1 }}.", "line 1: format width 999999999"),
    ("Describe {{ 'x' | center(10 ** 9) }}.", "line 1: center(1000000000): a width over"),
    ("Describe.\n{{ sample.width / 0 }}", "line 2: ZeroDivisionError: division by zero"),
    ("{% for i in range(10000) %}{% for j in range(1000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
     "the prompt grows past 1000000 characters"),
])
def test_template_that_would_read_a_file_or_eat_the_machine_is_one_line(tmp_path, source, fragment):
    (tmp_path / "secret.txt").write_text("SECRET {{ 1 }}")
    (tmp_path / "hostile.j2").write_text(source)
    pipeline = small_pipeline(tmp_path, caption__template="hostile.j2")
    err = one_line_exit_2(["validate", pipeline], "caption.template: template hostile.j2: " + fragment)
    assert "SECRET" not in err


def test_template_bounds_at_run_time_reject_the_row_not_the_run(tmp_path):
    """A branch validate's example does not take (a wide image) meets a bound on a real row: that row is
    rejected with template_error, as any other render failure; the run refuses the template at validate."""
    from m3t_gen.text.templates import PromptTemplate, TemplateError

    template = PromptTemplate("t.j2", "t.j2", "Describe.{% if sample.width > 4000 %}{{ range(10 ** 9) | list }}"
                                              "{% endif %}")
    assert template.render(sample={"width": 640}) == "Describe."
    with pytest.raises(TemplateError, match=r"template t.j2: line 1: range\(\) of 1000000000 items"):
        template.render(sample={"width": 5000})
    (tmp_path / "hostile.j2").write_text("{% include 'x' %}")
    one_line_exit_2(["run", small_pipeline(tmp_path, caption__template="hostile.j2")], "{% include %} is not "
                                                                                       "supported")
