"""`m3t-gen card OUT`: write OUT/README.md, a dataset card the Hugging Face hub and `datasets` understand.

The YAML header carries license, task categories, size category, pretty name, tags and ``configs``: the
``default`` config's ``data_files`` point at ``shards/*.tar`` (the M3T samples), so ``datasets.load_dataset(OUT)``
(or the hub repo) loads the WebDataset shards; a CIR-only run points it at ``triplets/*.jsonl`` instead
(``datasets`` infers one builder per folder, so tars and JSONL cannot be two configs of one card). The body
(``card_template.md.j2``) describes the recipe, models, prompt templates (text and hashes), counts, rejection
reasons, plots (``OUT/card/*.png``) and a gallery of examples (``OUT/card/example-*.jpg``). Everything comes
from the finished run: manifest, stats, index parquet, tars, triplets.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

from m3t_gen.run.artefacts import CirSummary, Manifest
from m3t_gen.storage.store import atomic_write_bytes
from m3t_gen.tools.run_reader import (iter_samples, iter_triplets, read_manifest, read_shard_stats, sorted_turns,
                                      tar_paths, triplet_files)

TEMPLATE = "card_template.md.j2"
GALLERY = 6
THUMB = 256

# What each recipe writes, for the card's opening paragraph; an unknown recipe gets a generic line.
RECIPES: dict[str, str] = {
    "m3t": ("M3T multi-turn dialogues (the MuCo recipe): for every image an MLLM wrote an objective dense "
            "caption, then an LLM wrote several typed query → target pairs in one call (classification, "
            "retrieval whose target is the dense caption, holistic / localized / creative VQA). A CLIP reward "
            "scored the caption and every turn, and a filter dropped weak turns and samples, each with its "
            "reason."),
    "cir": ("CIR triplets (composed image retrieval, MTCIR-style): image pairs mined by CLIP image similarity "
            "inside a band and a rank window, modification texts (reference → target, by category) written by "
            "an LLM from the two dense captions, CLIP scores for every triplet and modification, and a filter "
            "(score minimums, privacy) with a reason for every drop."),
}
TASKS: dict[str, list[str]] = {
    "m3t": ["image-text-to-text", "visual-question-answering", "feature-extraction"],
    "cir": ["image-feature-extraction", "feature-extraction"],
}
DEFAULT_TASKS = ["feature-extraction"]
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"),
                   (1_000_000_000_000, "100B<n<1T")]


def size_category(n: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>1T"


def _stage_config(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """A stage's (or a model role's: the roles are stage names) section of the run's config, where the stage's
    declaration says it is."""
    from m3t_gen.run.recipe import STAGES

    found = STAGES[stage].settings(cfg) if stage in STAGES else None
    return found if isinstance(found, dict) else {}


def _license(manifest: Manifest) -> str:
    candidate = manifest.setting("output.license")
    return candidate.strip() if isinstance(candidate, str) and candidate.strip() else "other"


# ----------------------------------------------------------------------------------------- markdown text
# One pass over the text: HTML specials and markdown punctuation become entities (two passes would re-escape
# the ampersands of the first pass's entities).
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;", "|": "&#124;",
                "\\": "&#92;", "`": "&#96;", "*": "&#42;", "_": "&#95;", "[": "&#91;", "]": "&#93;",
                "~": "&#126;", "#": "&#35;", "!": "&#33;", "$": "&#36;"}
_MD_RE = re.compile("[" + re.escape("".join(_MD_ENTITIES)) + "]")


def md(value: Any) -> str:
    """Untrusted text as inert inline markdown: one line, HTML specials and markdown punctuation as entities."""
    if value is None:
        return "—"
    text = " ".join(str(value).split())
    return _MD_RE.sub(lambda m: _MD_ENTITIES[m.group()], text)


def code(value: Any) -> str:
    """Text for inside an inline code span (entities would show literally there): one line, no backticks,
    pipes escaped for tables."""
    text = " ".join(str(value).split()) if value is not None else "none"
    return text.replace("`", "'").replace("|", "\\|")


def _short(text: Any, limit: int) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


# ----------------------------------------------------------------------------------------- data
def _index_columns(out_dir: Path) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["caption_score", "turn_types", "turn_scores", "width", "height"]
    tables = [pq.read_table(p, columns=cols) for p in sorted((out_dir / "index").glob("*.parquet"))]
    if not tables:
        return {c: [] for c in cols}
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_pylist() for c in cols}


def _templates(manifest: Manifest, out_dir: Path) -> list[dict[str, Any]]:
    from m3t_gen.bundled import find_file

    out = []
    for stage, recorded in manifest.templates.items():
        name = _stage_config(manifest.config, stage).get("template") or "?"
        entry: dict[str, Any] = {"stage": stage, "name": name, "hash": recorded, "sha256": None, "text": None,
                                 "note": None, "fence": "```"}
        try:
            # The text the run used, as its manifest keeps it; a bundled file of that name otherwise (older runs).
            text = manifest.template_texts.get(stage) or find_file(name, "prompts").read_text()
        except (FileNotFoundError, OSError):
            entry["note"] = "the template file is not available where this card was written"
            out.append(entry)
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if recorded and not digest.startswith(str(recorded)):
            entry["note"] = (f"the bundled {name} has changed since the run (its hash is now {digest[:12]}); "
                             f"the text the run used is not shown")
        else:
            entry.update(sha256=digest, text=text.rstrip("\n"), fence=_fence(text))
        out.append(entry)
    return out


def _models(manifest: Manifest) -> list[dict[str, Any]]:
    rows = []
    for role, model in manifest.models.items():
        spec = _stage_config(manifest.config, role).get("model")
        backend = revision = None
        if isinstance(spec, dict):
            backend, revision = spec.get("backend"), spec.get("revision")
        rows.append({"role": role, "model": str(model).replace("`", "'"), "backend": backend,
                     "revision": revision})
    return rows


# ----------------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _plots(index: dict[str, list[Any]], mix: dict[str, int], card_dir: Path) -> list[dict[str, str]]:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    if not index["width"]:
        return []
    plots = []

    turn_scores = [s for scores in index["turn_scores"] for s in (scores or []) if s is not None]
    caption_scores = [s for s in index["caption_score"] if s is not None]
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    for ax, values, title in zip(fig.subplots(1, 2), (turn_scores, caption_scores),
                                 ("kept turn scores", "caption scores")):
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="#4878a8", edgecolor="white")
        ax.set_title(f"{title} (n={len(values)})")
        ax.set_xlabel("reward score (cosine)")
        ax.set_ylabel("count")
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, card_dir / "scores.png")
    plots.append({"title": "Histograms of kept turn scores and caption scores", "path": "card/scores.png"})

    counts: dict[str, int] = {t: 0 for t in mix}
    for types in index["turn_types"]:
        for t in types or []:
            counts[t] = counts.get(t, 0) + 1
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(list(counts), list(counts.values()), color="#6a9f58")
    ax.set_title("kept turns by type")
    ax.set_ylabel("turns")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, card_dir / "turn_types.png")
    plots.append({"title": "Turn-type mix of the kept turns", "path": "card/turn_types.png"})

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(index["width"], index["height"], s=12, alpha=0.6, color="#b5533c")
    ax1.set_xlabel("width (px)")
    ax1.set_ylabel("height (px)")
    ax1.set_title("image sizes")
    longer = [max(w, h) for w, h in zip(index["width"], index["height"])]
    ax2.hist(longer, bins=min(30, max(5, len(longer) // 3)), color="#b5533c", edgecolor="white")
    ax2.set_xlabel("longer side (px)")
    ax2.set_ylabel("images")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_title(f"longer side (n={len(longer)})")
    _save(fig, card_dir / "image_sizes.png")
    plots.append({"title": "Image sizes of the kept samples", "path": "card/image_sizes.png"})
    return plots


def _gallery(out_dir: Path, card_dir: Path, n: int) -> list[dict[str, Any]]:
    for stale in card_dir.glob("example-*.jpg"):
        stale.unlink()
    gallery = []
    for key, image, sample in iter_samples(out_dir, "shards"):
        if len(gallery) >= n:
            break
        if image is None:
            continue
        try:
            thumb = _thumb_bytes(image)
        except Exception:  # a damaged image must not stop the card
            continue
        name = f"example-{len(gallery)}.jpg"
        (card_dir / name).write_bytes(thumb)
        turns = [{"type": t.get("type"), "score": _fmt(t.get("score")), "query": _short(t.get("query"), 160),
                  "target": _short(t.get("target"), 160)} for t in sorted_turns(sample)[:2]]
        gallery.append({"key": key, "thumb": f"card/{name}", "caption": _short(sample.get("caption"), 300),
                        "turns": turns})
    return gallery


# ----------------------------------------------------------------------------------------- the card
QUALITY_TYPE_FIELDS = ("requested_share", "kept_share", "generated", "kept", "query_words", "target_words",
                       "distinct_2_queries", "distinct_2_targets", "leaked_targets", "clip_score", "verdicts",
                       "judge_score", "answer_agreement", "self_retrieval_prob")


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _num(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _words(summary: dict[str, Any] | None) -> str:
    return "—" if not summary or not summary.get("n") else f"{summary['p50']} / {summary['p90']}"


def _verdicts(counts: dict[str, int] | None) -> str:
    return "—" if not counts else ", ".join(f"{k} {v}" for k, v in counts.items())


def _mean_score(counts: dict[str, int] | None) -> float | None:
    n = sum((counts or {}).values())
    return sum(int(k) * v for k, v in counts.items()) / n if n else None


def _quality(out_dir: Path, manifest: Manifest, card_dir: Path) -> dict[str, Any]:
    """The manifest's quality report (computed now for an output that has none), its table rows, its plots."""
    from m3t_gen.storage.store import Store
    from m3t_gen.run.quality import quality_report

    quality = manifest.quality
    if quality is None:
        quality = quality_report(Store(out_dir), manifest.config)
    quality = {"m3t": None, "cir": None, "negatives": None, **quality}  # the template asks for each
    if quality["cir"]:
        quality["cir"] = {"verdicts": None, "judge_score": None, **quality["cir"]}  # an unjudged pass has none
    rows, leaks = [], []
    for t, r in ((quality["m3t"] or {}).get("types") or {}).items():
        r = {f: r.get(f) for f in QUALITY_TYPE_FIELDS}
        rows.append([md(t), _pct(r["requested_share"]), _pct(r["kept_share"]), str(r["generated"]), str(r["kept"]),
                     _words(r["query_words"]), _words(r["target_words"]),
                     f"{_num(r['distinct_2_queries'])} / {_num(r['distinct_2_targets'])}",
                     _pct((r["leaked_targets"] or {}).get("share")), _num((r["clip_score"] or {}).get("mean")),
                     md(_verdicts(r["verdicts"])), _num(_mean_score(r["judge_score"])),
                     _num((r["answer_agreement"] or {}).get("mean"))])
        leaks += [(t, *example) for example in (r["leaked_targets"] or {}).get("examples", [])[:1]]
    negatives_rows, negatives_examples = _negatives_rows(quality["negatives"])
    return {"quality": quality, "quality_rows": rows, "quality_leaks": leaks,
            "negatives_rows": negatives_rows, "negatives_examples": negatives_examples,
            "quality_plots": _quality_plots(quality, card_dir) + _negatives_plot(quality["negatives"], card_dir)}


NEGATIVE_REASONS = ("same_text", "near_duplicate", "above_positive", "over_limit")


def _negatives_rows(report: dict[str, Any] | None) -> tuple[list[list[str]], list[tuple[str, str, dict]]]:
    rows, examples = [], []
    for t, r in ((report or {}).get("types") or {}).items():
        dropped = [_pct((r["dropped"].get(why) or {}).get("share")) for why in NEGATIVE_REASONS]
        rows.append([md(t), str(r["candidates"]), str(r["kept"]), *dropped, _num(r["similarity"]["mean"]),
                     f"{_num(r['score']['mean'])} vs {_num(r['positive_score']['mean'])}"])
        examples += [(t, why, ex) for why, found in r["examples"].items() if why != "over_limit" for ex in found[:1]]
    return rows, examples


def _negatives_plot(report: dict[str, Any] | None, card_dir: Path) -> list[dict[str, str]]:
    """Kept negatives' scores against the query beside the positives' own, all types together."""
    from matplotlib.figure import Figure

    if not report or not report.get("types"):
        return []
    fig = Figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.subplots()
    for field, label, color in (("positive_score", "positives", "C0"), ("score", "kept negatives", "C3")):
        counts = None
        for r in report["types"].values():
            h = r[field]
            counts = h["counts"] if counts is None else [a + b for a, b in zip(counts, h["counts"])]
        lo, hi = -1.0, 1.0
        width = (hi - lo) / len(counts)
        ax.plot([lo + width * (i + 0.5) for i in range(len(counts))], counts, marker="o", ms=3, label=label,
                color=color)
    ax.set_title("CLIP score against the query")
    ax.set_xlabel("score")
    ax.set_ylabel("targets")
    ax.legend(fontsize=7)
    _save(fig, card_dir / "negatives.png")
    return [{"title": "Hard negatives: their scores against the query beside the positives'",
             "path": "card/negatives.png"}]


def _quality_plots(quality: dict[str, Any], card_dir: Path) -> list[dict[str, str]]:
    """Score distributions per turn type with the thresholds marked, and the judge's scores."""
    from matplotlib.figure import Figure

    m3t = quality["m3t"]
    plots: list[dict[str, str]] = []
    if not m3t:
        return plots
    types = [t for t, r in m3t["types"].items() if r.get("clip_score")]
    panels = [("clip_score", "CLIP score", m3t["thresholds"].get("min_turn_score")),
              ("self_retrieval_prob", "self-retrieval probability", m3t["thresholds"].get("min_turn_prob")),
              ("answer_agreement", "answer agreement", m3t["thresholds"].get("min_answer_agreement"))]
    panels = [p for p in panels if any(m3t["types"][t].get(p[0]) for t in types)]
    judged = [t for t in types if m3t["types"][t].get("judge_score")]
    if not types:
        return plots
    color = {t: f"C{i}" for i, t in enumerate(types)}  # one colour per type in every panel
    cols = len(panels) + bool(judged)
    fig = Figure(figsize=(4.2 * cols, 3.4), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    for ax, (field, label, threshold) in zip(axes, panels):
        for t in types:
            h = m3t["types"][t].get(field)
            if h:
                width = (h["hi"] - h["lo"]) / len(h["counts"])
                xs = [h["lo"] + width * (i + 0.5) for i in range(len(h["counts"]))]
                ax.plot(xs, h["counts"], marker="o", ms=3, label=t, color=color[t])
        if threshold is not None:
            ax.axvline(threshold, color="#b5533c", ls="--", label=f"threshold {threshold}")
        ax.set_title(f"kept turns: {label}")
        ax.set_xlabel(label)
        ax.set_ylabel("turns")
    if judged:
        ax = axes[-1]
        bottom = [0] * 5
        for t in judged:
            counts = [m3t["types"][t]["judge_score"].get(str(k), 0) for k in range(1, 6)]
            ax.bar(range(1, 6), counts, bottom=bottom, label=t, color=color[t])
            bottom = [b + c for b, c in zip(bottom, counts)]
        threshold = m3t["thresholds"].get("min_judge_score")
        if threshold is not None:
            ax.axvline(threshold - 0.5, color="#b5533c", ls="--", label=f"min_judge_score {threshold}")
        ax.set_title("kept turns: judge score")
        ax.set_xlabel("judge score (1-5)")
        ax.set_ylabel("turns")
    axes[0].legend(fontsize=7)
    _save(fig, card_dir / "quality.png")
    plots.append({"title": "Score distributions of the kept turns per type, thresholds dashed",
                  "path": "card/quality.png"})
    return plots


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent)),
                             autoescape=False, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md"] = md
    env.filters["code"] = code
    from m3t_gen.run.quality import NEAR_DUPLICATE_JACCARD

    env.globals.update(pct=_pct, num=_num, words=_words, verdicts=_verdicts, mean_score=_mean_score,
                       near_jaccard=NEAR_DUPLICATE_JACCARD)  # the CIR paragraph formats its figures in place
    return env


def card_header(manifest: Manifest, has_triplets: bool = False, triplet_tars: bool = False) -> dict[str, Any]:
    parts = manifest.recipe_parts()
    tasks: list[str] = []
    for part in parts:
        tasks += [t for t in TASKS.get(part, DEFAULT_TASKS) if t not in tasks]
    # `datasets` infers one builder for a folder from all its configs' files: tars and JSONL cannot be two
    # configs of one card. The M3T shards are the default config; the triplets are, when there are no shards.
    shards_first = "m3t" in parts or not has_triplets
    path = "shards/*.tar" if shards_first else "triplets/*.jsonl"
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": path}]}]
    if shards_first and has_triplets and triplet_tars:
        # The triplets as WebDataset tars too (triplet_shards/): the same builder, so a second config works.
        configs.append({"config_name": "triplets",
                        "data_files": [{"split": "train", "path": "triplet_shards/*.tar"}]})
    counts = manifest.totals if shards_first else manifest.cir
    recipe = "+".join(parts)
    tags = ["m3t-gen", "synthetic", "multimodal", "image-text", "webdataset" if shards_first else "jsonl", *parts]
    if "cir" in parts:
        tags.append("composed-image-retrieval")
    return {
        "license": _license(manifest),
        "task_categories": tasks,
        "size_categories": [size_category(int(counts.kept or 0) if counts else 0)],
        "pretty_name": f"{manifest.name or 'm3t-gen run'} ({recipe}, m3t-gen)",
        "tags": tags,
        "configs": configs,
    }


def _flat(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: _fmt(value)}


def _cir_context(out_dir: Path, manifest: Manifest, card_dir: Path, n: int) -> dict[str, Any] | None:
    """Counts, reasons, thresholds, a plot and a few examples of the CIR triplets; None without CIR."""
    files = triplet_files(out_dir)
    if manifest.cir is None and not files:
        return None
    summary = manifest.cir or CirSummary()  # triplets without a summary: its counts unknown (None)
    categories: dict[str, int] = {}
    similarity, directional, kept_mods, dropped_mods = [], [], 0, 0
    examples = []
    for t in iter_triplets(out_dir):
        for m in t["modifications"]:
            categories[str(m.get("category"))] = categories.get(str(m.get("category")), 0) + 1
        kept_mods += len(t["modifications"])
        dropped_mods += len(t.get("dropped_modifications") or [])
        if isinstance(t.get("similarity"), (int, float)):
            similarity.append(t["similarity"])
        if isinstance((t.get("scores") or {}).get("directional"), (int, float)):
            directional.append(t["scores"]["directional"])
        if len(examples) < n:
            examples.append(t)
    plots = _cir_plots(categories, similarity, directional, card_dir) if files else []
    gallery = _cir_gallery(out_dir, examples, card_dir)
    return {
        "summary": summary, "files": len(files), "kept_modifications": kept_mods,
        "dropped_modifications": dropped_mods,
        "reasons": [{"code": code, "count": count}
                    for code, count in sorted(summary.reasons.items(), key=lambda kv: (-kv[1], kv[0]))],
        "thresholds": {**_flat("pairing", manifest.setting("cir.pairing", {})),
                       **_flat("filter", manifest.setting("cir.filter", {}))},
        "plots": plots, "gallery": gallery,
    }


def _cir_plots(categories: dict[str, int], similarity: list[float], directional: list[float],
               card_dir: Path) -> list[dict[str, str]]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 3.4), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    names = sorted(categories, key=lambda c: (-categories[c], c))
    ax1.barh(names[::-1], [categories[c] for c in names[::-1]], color="#8a6bb0")
    ax1.set_title("kept modifications by category")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, values, title, color in ((ax2, similarity, "pair image similarity", "#4878a8"),
                                     (ax3, directional, "directional score", "#6a9f58")):
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color=color, edgecolor="white")
        ax.set_title(f"{title} (n={len(values)})")
        ax.xaxis.set_major_locator(MaxNLocator(5))
    for ax in (ax2, ax3):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, card_dir / "cir.png")
    return [{"title": "CIR triplets: modification categories, pair similarity, directional score",
             "path": "card/cir.png"}]


def _thumb_bytes(image: bytes) -> bytes:
    from m3t_gen.storage.images import thumbnail_jpeg

    return thumbnail_jpeg(image, THUMB)


def _cir_gallery(out_dir: Path, triplets: list[dict[str, Any]], card_dir: Path) -> list[dict[str, Any]]:
    from m3t_gen.tools.run_reader import find_images

    for stale in card_dir.glob("triplet-*.jpg"):
        stale.unlink()
    keys = {t[f] for t in triplets for f in ("image", "target_image")}
    names = {}
    for key, image in find_images(out_dir, keys):
        name = f"triplet-{len(names)}.jpg"
        try:
            (card_dir / name).write_bytes(_thumb_bytes(image))
        except Exception:  # a damaged image must not stop the card
            continue
        names[key] = f"card/{name}"
    return [{"id": t["id"], "ref": names.get(t["image"]), "tgt": names.get(t["target_image"]),
             "ref_key": t["image"], "tgt_key": t["target_image"],
             "mods": [{"category": m.get("category"), "text": _short(m.get("text"), 160)}
                      for m in t["modifications"][:3]]}
            for t in triplets]


def write_card(out_dir: Path) -> Path:
    """Write OUT/README.md (and its plots and thumbnails under OUT/card/); returns the README's path."""
    import yaml

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    parts = manifest.recipe_parts()
    recipe = "+".join(parts)
    card_dir = out_dir / "card"
    card_dir.mkdir(exist_ok=True)

    header = card_header(manifest, has_triplets=bool(triplet_files(out_dir)),
                         triplet_tars=any((out_dir / "triplet_shards").glob("*.tar")))
    totals = manifest.totals
    stats = read_shard_stats(out_dir)
    mix = manifest.setting("dialogue.mix", {})
    reasons = []
    for code, count in sorted(totals.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        stage, _, reason = code.partition(":")
        share = f"{100 * count / totals.read:.1f} %" if totals.read else "—"
        reasons.append({"stage": stage if reason else "—", "reason": reason or stage, "count": count,
                        "share": share})
    description = " ".join(RECIPES.get(p, f"Data written by the m3t-gen recipe {p}.") for p in parts)
    context = {
        "header": yaml.safe_dump(header, sort_keys=False, allow_unicode=True, default_flow_style=False),
        "pretty_name": header["pretty_name"],
        "data_path": header["configs"][0]["data_files"][0]["path"],
        "recipe_description": md(description),
        "name": manifest.name, "recipe": recipe, "config_hash": manifest.config_hash,
        "version": manifest.versions.get("m3t-gen", ""), "finished": manifest.finished,
        "seed": manifest.setting("seed"),
        "totals": totals,
        "turns_kept": sum(s.turns_kept for s in stats) if stats else None,
        "turns_dropped": sum(s.turns_dropped for s in stats) if stats else None,
        "shards": len(stats) or manifest.shards,
        "tars": len(tar_paths(out_dir, "shards")),
        "wall_seconds": manifest.wall_seconds,
        "stages": manifest.stages,
        "reasons": reasons,
        "models": _models(manifest),
        "mix": {k: v for k, v in mix.items() if v},
        "filter": _flat("", manifest.setting("filter", {})),
        "templates": _templates(manifest, out_dir),
        "plots": _plots(_index_columns(out_dir), mix, card_dir),
        "gallery": _gallery(out_dir, card_dir, GALLERY),
        "cir": _cir_context(out_dir, manifest, card_dir, 3),
        **_quality(out_dir, manifest, card_dir),
        "versions": manifest.versions,
        "refilters": [", ".join(r.get("set", [])) for r in manifest.refilters or []],
    }
    text = _environment().get_template(TEMPLATE).render(**context)
    path = out_dir / "README.md"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
