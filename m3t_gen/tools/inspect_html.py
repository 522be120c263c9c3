"""`m3t-gen inspect OUT --html PATH [--n 24]`: one self-contained HTML page to look at a finished run.

Shows the first N kept samples (thumbnail, caption, every turn with type / query / target / score / rank /
prob and its hard negatives, dropped turns greyed out with their reason, the sample's scores and source) and, when OUT/filtered holds
any, the first N samples the filter rejected, with the reason. Images are inlined as base64 data URLs and the
CSS is inline: the file opens anywhere, offline, and loads nothing. All text from the run (web alt-text, URLs,
generated text) is untrusted: the template autoescapes every value, and URLs are shown as text, never linked.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Iterator

from m3t_gen.storage.store import atomic_write_bytes
from m3t_gen.tools.run_reader import (RunOutputError, find_images, iter_samples, iter_triplets, read_manifest,
                                      refuse_inside_run, triplet_files)

THUMB = 320
# In every page's head: an existing file is overwritten only when it carries this (an earlier page of inspect).
GENERATOR = '<meta name="generator" content="m3t-gen inspect">'

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
""" + GENERATOR + """
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>m3t-gen: {{ name }}</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
.meta { color: #555; margin-bottom: 12px; }
.counts span { display: inline-block; margin-right: 14px; }
.sample { display: flex; gap: 14px; background: #fff; border: 1px solid #ddd; border-radius: 6px;
          padding: 10px; margin-bottom: 10px; }
.sample.rejected { border-color: #d9a3a3; background: #fff8f8; }
.thumb { flex: 0 0 auto; width: 240px; }
.thumb img { max-width: 240px; max-height: 240px; display: block; border-radius: 4px; }
.thumb .small { font-size: 12px; color: #666; word-break: break-all; margin-top: 4px; }
.body { flex: 1 1 auto; min-width: 0; }
.key { font-family: ui-monospace, monospace; font-weight: 600; }
.caption { margin: 4px 0 6px; }
.scores { font-size: 12px; color: #444; margin-bottom: 6px; }
.scores span { margin-right: 10px; }
.reason { color: #a33; font-weight: 600; margin-bottom: 6px; }
.reason .detail { font-weight: 400; font-size: 12px; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
table.turns { border-collapse: collapse; width: 100%; font-size: 13px; table-layout: fixed; }
table.turns th, table.turns td { border-top: 1px solid #eee; padding: 3px 6px; text-align: left;
                                 vertical-align: top; overflow-wrap: anywhere; }
table.turns th { color: #666; font-weight: 600; }
table.turns col.type { width: 110px; } table.turns col.num { width: 64px; }
tr.dropped td { color: #999; background: #f4f4f4; }
tr.dropped td.why { color: #a66; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.alt { font-size: 12px; color: #666; }
.sample.triplet .thumb { width: 200px; } .sample.triplet .thumb img { max-width: 200px; max-height: 200px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
</style>
</head>
<body>
<h1>m3t-gen run {{ name }}</h1>
<div class="meta">recipe {{ recipe }} · config hash {{ config_hash }} · {{ out_dir }}</div>
<div class="counts">
{% for label, value in counts %}<span>{{ label }}: <b>{{ value }}</b></span>{% endfor %}
</div>
{% macro sample_card(s, rejected) %}
<div class="sample{% if rejected %} rejected{% endif %}">
  <div class="thumb">
    {% if s.thumb %}<img src="{{ s.thumb }}" alt="{{ s.key }}">{% else %}<div>(no image)</div>{% endif %}
    <div class="small">{{ s.width }}×{{ s.height }}</div>
    {% if s.url %}<div class="small">{{ s.url }}</div>{% endif %}
  </div>
  <div class="body">
    <div class="key">{{ s.key }}</div>
    {% if s.rejection %}<div class="reason">rejected at {{ s.rejection.stage }}: {{ s.rejection.reason }}{% if s.rejection.detail %} <span class="detail">{{ s.rejection.detail }}</span>{% endif %}</div>{% endif %}
    <div class="caption">{{ s.caption }}</div>
    {% if s.alt %}<div class="alt">alt-text: {{ s.alt }}</div>{% endif %}
    {% if s.flags %}<div class="small">repaired on reading: {{ s.flags | join(", ") }}</div>{% endif %}
    <div class="scores">{% for label, value in s.scores %}<span>{{ label }} <b>{{ value }}</b></span>{% endfor %}</div>
    <table class="turns">
      <colgroup><col class="type"><col><col><col class="num"><col class="num"><col class="num"><col><col></colgroup>
      <tr><th>type</th><th>query</th><th>target</th><th class="num">score</th><th class="num">rank</th><th class="num">prob</th><th>judge</th><th>dropped because</th></tr>
      {% for t in s.turns %}
      <tr{% if t.dropped %} class="dropped"{% endif %}>
        <td>{{ t.type }}</td><td>{{ t.query }}</td><td>{{ t.target }}</td>
        <td class="num">{{ t.score }}</td><td class="num">{{ t.rank }}</td><td class="num">{{ t.prob }}</td>
        <td class="why">{{ t.judge }}</td><td class="why">{{ t.reason }}</td>
      </tr>
      {% if t.negatives %}
      <tr class="negatives"><td class="small">hard negatives</td><td colspan="7" class="small">{% for n in t.negatives %}<span title="from {{ n.source }}, rank {{ n.rank }}">&#10007; {{ n.text }} <b>{{ n.score }}</b> (sim {{ n.similarity }})</span>{% if not loop.last %}; {% endif %}{% endfor %}</td></tr>
      {% endif %}
      {% endfor %}
    </table>
    {% if s.negative_images %}<div class="small">negative images: {% for n in s.negative_images %}{{ n.source }} (sim {{ n.similarity }}, score {{ n.score }}){% if not loop.last %}, {% endif %}{% endfor %}</div>{% endif %}
  </div>
</div>
{% endmacro %}
<h2>Kept samples ({{ kept | length }} of {{ kept_total }})</h2>
{% for s in kept %}{{ sample_card(s, False) }}{% else %}<p>No kept samples.</p>{% endfor %}
{% if filtered is not none %}
<h2>Rejected by the filter ({{ filtered | length }} shown)</h2>
{% for s in filtered %}{{ sample_card(s, True) }}{% else %}<p>None.</p>{% endfor %}
{% endif %}
{% if triplets is not none %}
<h2>CIR triplets ({{ triplets | length }} shown{% if cir_kept is not none %} of {{ cir_kept }}{% endif %})</h2>
{% for t in triplets %}
<div class="sample triplet">
  <div class="thumb">
    {% if t.ref %}<img src="{{ t.ref }}" alt="{{ t.image }}">{% else %}<div>(no image)</div>{% endif %}
    <div class="small">reference {{ t.image }}</div>
  </div>
  <div class="thumb">
    {% if t.tgt %}<img src="{{ t.tgt }}" alt="{{ t.target_image }}">{% else %}<div>(no image)</div>{% endif %}
    <div class="small">target {{ t.target_image }}</div>
  </div>
  <div class="body">
    <div class="key">{{ t.id }}</div>
    <div class="scores">{% for label, value in t.scores %}<span>{{ label }} <b>{{ value }}</b></span>{% endfor %}</div>
    {% if t.reference_caption %}<div class="alt">reference caption: {{ t.reference_caption }}</div>{% endif %}
    {% if t.target_caption %}<div class="alt">target caption: {{ t.target_caption }}</div>{% endif %}
    <table class="turns">
      <colgroup><col class="type"><col><col class="num"><col><col></colgroup>
      <tr><th>category</th><th>modification</th><th class="num">score</th><th>judge</th><th>dropped because</th></tr>
      {% for m in t.mods %}
      <tr{% if m.dropped %} class="dropped"{% endif %}><td>{{ m.category }}</td><td>{{ m.text }}</td>
        <td class="num">{{ m.score }}</td><td class="why">{{ m.judge }}</td><td class="why">{{ m.reason }}</td></tr>
      {% endfor %}
    </table>
  </div>
</div>
{% else %}<p>No kept triplets.</p>{% endfor %}
{% if triplet_rejects %}
<h3>Rejected triplets ({{ triplet_rejects | length }} shown)</h3>
<table class="turns rejects">
  <tr><th>id</th><th>stage</th><th>reason</th><th>detail</th></tr>
  {% for r in triplet_rejects %}
  <tr><td>{{ r.id }}</td><td>{{ r.stage }}</td><td>{{ r.reason }}</td><td>{{ r.detail }}</td></tr>
  {% endfor %}
</table>
{% endif %}
{% endif %}
</body>
</html>
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _thumb(image: bytes | None) -> str | None:
    if not image:
        return None
    from m3t_gen.storage.images import thumbnail_jpeg

    try:
        data = thumbnail_jpeg(image, THUMB, quality=80)
    except Exception:  # a damaged image must not stop the page
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _view(key: str, image: bytes | None, sample: dict[str, Any]) -> dict[str, Any]:
    turns = [dict(t, dropped=False) for t in sample.get("turns", [])]
    turns += [dict(t, dropped=True) for t in sample.get("dropped_turns", [])]
    turns.sort(key=lambda t: t.get("i", 0))
    scores = sample.get("scores") or {}
    labels = (("caption", "caption"), ("mean_turn", "mean turn"), ("min_turn", "min turn"),
              ("caption_rank", "caption rank"), ("caption_prob", "caption prob"), ("k", "distractors"))
    img = sample.get("image") or {}
    src = sample.get("source") or {}
    rejection = sample.get("rejected")
    if rejection:
        import json

        detail = rejection.get("detail")
        rejection = {"stage": rejection.get("stage"), "reason": rejection.get("reason"),
                     "detail": json.dumps(detail, ensure_ascii=False) if detail else None}
    return {
        "key": key, "thumb": _thumb(image), "width": img.get("width"), "height": img.get("height"),
        "url": src.get("url"), "alt": src.get("text"), "caption": sample.get("caption"),
        "scores": [(label, _num(scores[k])) for k, label in labels if scores.get(k) is not None],
        "rejection": rejection, "flags": sample.get("flags") or [],
        "turns": [{"type": t.get("type"), "query": t.get("query"), "target": t.get("target"),
                   "score": _num(t.get("score")), "rank": _num(t.get("rank")), "prob": _num(t.get("prob"), 3),
                   "judge": _judge(t), "reason": t.get("reason", "") if t["dropped"] else "",
                   "dropped": t["dropped"],
                   "negatives": [dict(n, score=_num(n.get("score")), similarity=_num(n.get("similarity")))
                                 for n in t.get("negatives") or []]}
                  for t in turns],
        "negative_images": [dict(n, score=_num(n.get("score")), similarity=_num(n.get("similarity")))
                            for n in sample.get("negative_images") or []],
    }


def _judge(item: dict[str, Any]) -> str:
    """The judge's verdict, score and reason (and its own answer, answerability on) as one cell; "" unjudged."""
    if item.get("verdict") is None:
        return ""
    text = f"{item['verdict']} {item.get('judge_score')}/5: {item.get('judge_reason') or ''}".strip()
    if item.get("answer") is not None:
        text += f" (judge answered {item['answer']!r}, agreement {_num(item.get('agreement'))})"
    return text


def _first(samples: Iterator[tuple[str, bytes | None, dict[str, Any]]], n: int) -> list[dict[str, Any]]:
    views = []
    for key, image, sample in samples:
        if len(views) >= n:
            break
        views.append(_view(key, image, sample))
    return views


def _triplet_views(out_dir: Path, n: int) -> list[dict[str, Any]]:
    triplets = []
    for t in iter_triplets(out_dir):
        if len(triplets) >= n:
            break
        triplets.append(t)
    thumbs = {key: _thumb(image) for key, image in
              find_images(out_dir, {t[f] for t in triplets for f in ("image", "target_image")})}
    views = []
    for t in triplets:
        extra = {k: v for k, v in (t.get("scores") or {}).items() if isinstance(v, (int, float))}
        scores = [] if "image_similarity" in extra else [("image similarity", _num(t.get("similarity")))]
        scores += [("rank", _num(t.get("rank")))] + [(k.replace("_", " "), _num(v)) for k, v in extra.items()]
        mods = [dict(m, dropped=False) for m in t["modifications"]]
        mods += [dict(m, dropped=True) for m in t.get("dropped_modifications") or []]
        views.append({
            "id": t["id"], "image": t["image"], "target_image": t["target_image"],
            "ref": thumbs.get(t["image"]), "tgt": thumbs.get(t["target_image"]),
            "reference_caption": t.get("reference_caption"), "target_caption": t.get("target_caption"),
            "scores": [(label, value) for label, value in scores if value != ""],
            "mods": [{"category": m.get("category"), "text": m.get("text"), "score": _num(m.get("score")),
                      "judge": _judge(m), "reason": m.get("reason", "") if m["dropped"] else "",
                      "dropped": m["dropped"]}
                     for m in mods],
        })
    return views


def _triplet_rejects(out_dir: Path, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in sorted((out_dir / "triplet_rejects").glob("*.parquet")):
        if len(rows) >= n:
            break
        rows += pq.read_table(path, columns=["id", "stage", "reason", "detail"]).slice(0, n - len(rows)).to_pylist()
    return rows


def render_html(out_dir: Path, n: int = 24) -> str:
    import jinja2

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    totals = manifest.totals
    counts: list[tuple[str, Any]] = [("read", totals.read), ("kept", totals.kept), ("rejected", totals.rejected)]
    counts += [(reason, count) for reason, count in sorted(totals.reasons.items())]
    counts += [(f"repaired: {flag}", count) for flag, count in sorted(totals.repairs.items())]
    counts += [(f"shard error: {shard}", "; ".join(messages))
               for shard, messages in sorted(totals.shard_errors.items())]
    has_filtered = (out_dir / "filtered").is_dir() and any((out_dir / "filtered").glob("*.tar"))
    has_triplets = bool(triplet_files(out_dir)) or manifest.cir is not None
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env.from_string(PAGE).render(
        name=manifest.name, recipe=manifest.recipe, config_hash=manifest.config_hash, out_dir=str(out_dir),
        counts=counts, kept=_first(iter_samples(out_dir, "shards"), n), kept_total=totals.kept,
        filtered=_first(iter_samples(out_dir, "filtered"), n) if has_filtered else None,
        triplets=_triplet_views(out_dir, n) if has_triplets else None,
        cir_kept=manifest.cir.kept if manifest.cir else None,
        triplet_rejects=_triplet_rejects(out_dir, n) if has_triplets else [],
    )


def write_html(out_dir: Path, html_path: Path, n: int = 24) -> Path:
    """Write the page for the finished run in ``out_dir`` to ``html_path``; returns ``html_path``."""
    html_path = Path(html_path)
    refuse_inside_run(html_path, "--html")
    _refuse_foreign_file(html_path)
    text = render_html(out_dir, n)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(html_path, text.encode("utf-8", errors="replace"))
    return html_path


def _refuse_foreign_file(path: Path) -> None:
    """An existing file is replaced only when it is an earlier page of this command (its generator tag says so)."""
    if not os.path.lexists(path):
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096) if path.is_file() else b""
    except OSError:
        head = b""
    if GENERATOR.encode() not in head:
        raise RunOutputError(f"--html {path}: exists and is not a page m3t-gen inspect wrote; refusing to "
                             f"overwrite it: give a new file name")
