"""`m3t-gen export OUT --format FMT --to PATH`: convert a finished run into the layout a trainer reads.

Formats live in ``EXPORTERS`` (name -> ``Format``: the file it writes and a function); adding one = one
function + its ``@exporter(name, file_name)``. ``PATH`` is a directory (the format's file is written inside it
under its default name) or, when it ends with the format's suffix, the file itself; JPEGs always go to
``images/`` beside that file, and image paths in the file are relative to the file's folder.

- ``muco``: what MuCo's trainer (``naver-ai/muco``, ``src/loader.py``) reads, in both of its modes::

      PATH/pretrain/M3T/M3T_generated_sentence.parquet   --meta_folder PATH/pretrain --pretraining
      PATH/finetune/M3T/M3T_generated_sentence.parquet   --meta_folder PATH/finetune
      PATH/images/<key>.jpg                              --image_folder PATH/images

  (the loader globs ``META/*/*_generated_sentence.parquet`` and reads every file it finds, so the two modes get
  two meta folders). Pretraining fills exactly 7 turn slots in the loader's order (classification, 2 holistic,
  2 localized, creative, retrieval): only dialogues whose kept turns are exactly that mix go there, in that
  order; fine-tuning samples one turn per row, so every dialogue with a kept turn goes there. Columns:
  ``qry`` (per turn, a list of phrasings; each starts with the image placeholder ``<|image_1|>`` + newline,
  which the loader swaps for Qwen2-VL's image tokens), ``pos_text`` (per turn, the target), ``pos_sentence``
  and ``neg_text`` (per turn, empty: text targets, no negatives), ``qry_sentence`` (the dense caption: the
  loader's "Image description"), ``qry_image_path`` (``<key>.jpg``, relative to ``--image_folder``),
  ``pos_image_path`` (``''``: a text target), and ``key``, ``url``, ``turn_types``.

- ``cirr``: the CIRR layout CLIP4Cir's and SPRC's ``CIRRDataset`` read for training, one record per kept
  modification text: ``PATH/cirr/captions/cap.rc2.train.json`` (``pairid``, ``reference``, ``target_hard``,
  ``target_soft``, ``caption``, ``img_set: {id, members}``), ``PATH/cirr/image_splits/split.rc2.train.json``
  (name -> path relative to ``PATH``), ``PATH/train/<name>.jpg``. ``PATH`` is the trainers' ``cirr_dataset``.

- ``fashioniq``: the FashionIQ layout: ``PATH/captions/cap.<category>.train.json`` (``candidate``, ``target``,
  ``captions``: exactly two texts), ``PATH/image_splits/split.<category>.train.json`` (image names),
  ``PATH/images/<name>.<ext>`` (``jpg`` for CLIP4Cir, ``png`` for SPRC). A triplet's kept texts are paired in
  order (5 texts: 2 records, the fifth left out); a triplet with one text is left out. ``PATH`` is the trainers'
  ``fashionIQ_dataset``.

- ``mtcir``: CIR triplets as JSONL (``PATH/train.jsonl`` or ``PATH`` itself when it ends with ``.jsonl``), one
  ``{"id", "image", "target_image", "modifications"}`` object a line: ``image`` / ``target_image`` are the
  reference / target JPEGs (``images/<key>.jpg``, extracted from the run's pool/shards tars) and
  ``modifications`` the kept ``[{"category", "text"}, ...]``. This follows MTCIR's description in the CoLLM
  paper; no published loader reads it (none could be found), so it is not verified against one.

Every export prints what it wrote and what it left out, with counts and reasons.

Every file is written under a temporary name and renamed when complete. An export writes only into a folder it
made or that is empty, never inside a run output: the folder it writes into (``PATH``, or the ``.jsonl`` file's
folder) gets ``.m3t-gen-export`` first, naming the format, and a later export of the same format may write there
again; a non-empty folder without it, or with another format's, is refused.

A finished run is read through ``tools/run_reader.py`` (manifest, samples in the tars, triplets), the readers
``card.py`` and ``inspect_html.py`` share; heavy imports are deferred so that the CLI stays fast to start.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from m3t_gen.storage.store import atomic_write_bytes, staged_file
from m3t_gen.turns import CAPTION_TURN
from m3t_gen.tools.run_reader import (RunOutputError, find_images, iter_samples, iter_triplets, read_manifest,
                                      refuse_inside_run, sorted_turns, triplet_files)

ROW_GROUP = 1000  # small row groups: the HF dataset viewer and streaming readers cope badly with big ones
NO_TRIPLETS = "this run has no CIR triplets; run a CIR recipe"
EXPORT_MARKER = ".m3t-gen-export"  # written first into the folder an export writes into: {"format": ...}


# ----------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ExportOptions:
    image_ext: str = "jpg"     # fashioniq: jpg (CLIP4Cir) or png (SPRC)
    category: str = "dress"    # fashioniq: the dress type the trainers' --dress-types names
    split: str = "train"       # cirr / fashioniq: the split name in the file names


@dataclass(frozen=True)
class Format:
    name: str
    # None: --to is the dataset's root directory; else the file written inside a --to directory (a --to path
    # with this suffix is taken as the file itself)
    file_name: str | None
    write: Callable[[Path, Path, ExportOptions], dict[str, Any]]  # (run dir, target, options) -> summary


EXPORTERS: dict[str, Format] = {}
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")  # what the trainers' FashionIQDataset accepts
IMAGE_EXTS = ("jpg", "png")


def exporter(name: str, file_name: str | None) -> Callable[[Callable], Callable]:
    def register(fn: Callable[[Path, Path, ExportOptions], dict[str, Any]]) -> Callable:
        EXPORTERS[name] = Format(name, file_name, fn)
        return fn
    return register


def export(out_dir: Path, fmt: str, to: Path, options: ExportOptions | None = None) -> dict[str, Any]:
    """Export the finished run in ``out_dir`` as ``fmt`` to ``to``; returns a summary dict (format, rows, path,
    images, written: {file: rows}, left_out: {reason: count})."""
    try:
        spec = EXPORTERS[fmt]
    except KeyError:
        raise RunOutputError(f"unknown export format {fmt!r} (one of: {', '.join(sorted(EXPORTERS))})") from None
    options = options or ExportOptions()
    if options.image_ext not in IMAGE_EXTS:
        raise RunOutputError(f"image extension {options.image_ext!r}: expected one of {', '.join(IMAGE_EXTS)}")
    if options.category not in FASHIONIQ_CATEGORIES:
        raise RunOutputError(f"category {options.category!r}: the trainers accept {', '.join(FASHIONIQ_CATEGORIES)}")
    out_dir, to = Path(out_dir), Path(to)
    read_manifest(out_dir)
    if spec.file_name is None:
        target = to
        if target.exists() and not target.is_dir():
            raise RunOutputError(f"{target}: exists and is not a directory")
    else:
        target = to if to.suffix == Path(spec.file_name).suffix else to / spec.file_name
        if target.is_dir():
            raise RunOutputError(f"{target}: is a directory")
    if target.parent.exists() and not target.parent.is_dir():
        raise RunOutputError(f"{target.parent}: exists and is not a directory")
    refuse_inside_run(target, "--to")
    folder = target if spec.file_name is None else target.parent
    made = _claim_folder(folder, fmt)
    try:
        return spec.write(out_dir, target, options)
    except RunOutputError:
        if made and [p.name for p in folder.iterdir()] == [EXPORT_MARKER]:  # nothing written: leave no trace
            (folder / EXPORT_MARKER).unlink()
            folder.rmdir()
        raise


def _claim_folder(folder: Path, fmt: str) -> bool:
    """Mark ``folder`` as an export of ``fmt`` before anything is written there; refuse a non-empty folder that
    m3t-gen did not export into, or one that holds another format's export (files of one name would be
    overwritten, or two layouts mixed). Returns whether the folder was made here."""
    marker = folder / EXPORT_MARKER
    made = not folder.exists()
    if not made and any(folder.iterdir()):
        try:
            earlier = json.loads(marker.read_bytes()).get("format")
        except (OSError, ValueError, AttributeError):
            raise RunOutputError(f"--to {folder}: a non-empty folder that m3t-gen did not export into (no "
                                 f"{EXPORT_MARKER}); refusing to overwrite files there: give a new or empty "
                                 f"folder") from None
        if earlier != fmt:
            raise RunOutputError(f"--to {folder}: holds an m3t-gen {earlier} export; refusing to write a {fmt} "
                                 f"export over it: give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, json.dumps({"tool": "m3t-gen", "format": fmt}).encode())
    return made


def _make_dirs(target: Path) -> Path:
    images = target.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    return images


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data, ensure_ascii=False, indent=1).encode())


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(tmp), row_group_size=ROW_GROUP)


# ----------------------------------------------------------------------------------------- muco
# MuCo's loader: the placeholder its query texts carry (Phi-3-V's, swapped for Qwen2-VL's image tokens), and the
# 7 turn slots of its pretraining mode in their order (its comment: classification, 2 global VQA, 2 local VQA,
# creative VQA, retrieval).
MUCO_IMAGE_PLACEHOLDER = "<|image_1|>"
MUCO_PRETRAIN_SLOTS = ("classification", "vqa_holistic", "vqa_holistic", "vqa_localized", "vqa_localized",
                       "vqa_creative", "retrieval")
MUCO_META_FILE = "M3T/M3T_generated_sentence.parquet"  # META/*/*_generated_sentence.parquet


def _muco_schema():
    import pyarrow as pa

    texts = pa.list_(pa.string())
    return pa.schema([
        ("qry", pa.list_(texts)), ("pos_text", texts), ("pos_sentence", texts), ("neg_text", texts),
        ("qry_sentence", pa.string()), ("qry_image_path", pa.string()), ("pos_image_path", pa.string()),
        ("key", pa.string()), ("url", pa.string()), ("turn_types", texts),
    ])


def muco_row(key: str, sample: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "qry": [[f"{MUCO_IMAGE_PLACEHOLDER}\n{t['query']}"] for t in turns],
        "pos_text": [t["target"] for t in turns],
        "pos_sentence": ["" for _ in turns],
        "neg_text": ["" for _ in turns],
        "qry_sentence": sample.get("caption") or "",
        "qry_image_path": f"{key}.jpg", "pos_image_path": "",
        "key": key, "url": (sample.get("source") or {}).get("url"), "turn_types": [t["type"] for t in turns],
    }


def pretrain_order(turns: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The turns in MuCo's 7 pretraining slots, or None when they are not exactly that mix."""
    if sorted(t["type"] for t in turns) != sorted(MUCO_PRETRAIN_SLOTS):
        return None
    by_type: dict[str, list[dict[str, Any]]] = {}
    for t in turns:
        by_type.setdefault(t["type"], []).append(t)
    return [by_type[slot].pop(0) for slot in MUCO_PRETRAIN_SLOTS]


@exporter("muco", None)
def export_muco(out_dir: Path, target: Path, options: ExportOptions) -> dict[str, Any]:
    from collections import Counter

    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    pretrain, finetune = [], []
    left_out: Counter = Counter()
    for key, image, sample in iter_samples(out_dir, "shards"):
        if image is None:
            raise RunOutputError(f"{out_dir}: sample {key} has no JPEG in its tar")
        atomic_write_bytes(images / f"{key}.jpg", image)
        turns = sorted_turns(sample)
        if not turns:
            left_out["no kept turn (both files)"] += 1
            continue
        finetune.append(muco_row(key, sample, turns))
        slots = pretrain_order(turns)
        if slots is None:
            left_out["pretrain: kept turns are not the 7-slot mix " + "/".join(MUCO_PRETRAIN_SLOTS)] += 1
        else:
            pretrain.append(muco_row(key, sample, slots))
    schema = _muco_schema()
    written = {}
    for mode, rows in (("pretrain", pretrain), ("finetune", finetune)):
        path = target / mode / MUCO_META_FILE
        _write_parquet(path, rows, schema)
        written[str(path)] = len(rows)
    return {"format": "muco", "rows": len(finetune), "path": str(target), "images": str(images),
            "written": written, "left_out": dict(left_out)}


# ----------------------------------------------------------------------------------------- mmeb
# One row per kept turn (image + query -> target text), and per sample with a retrieval turn one text -> image
# row (its query -> the image), with the turn's hard negatives, in the layout of MMEB-train, read by VLM2Vec
# (datasets.load_dataset(root, subset, split="original")) and by MuCo's loader in its single-query mode (glob
# */*_generated_sentence.parquet). The two read negatives differently: VLM2Vec one string (a list crashes its
# parser), MuCo a non-empty list that it samples from (a string that is not a list literal, or an empty list,
# crashes it); so each subset is written once per loader, the MuCo rows without negatives in a subset of their own
# without the negative columns (MuCo then trains them with in-batch negatives only).
MMEB_SUBSETS = {"turns": "M3T_turns", "t2i": "M3T_t2i"}
MMEB_IMAGE_TARGET = f"{MUCO_IMAGE_PLACEHOLDER}\nRepresent the given image."  # MMEB's text of an image target


def _mmeb_rows(key: str, sample: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    image = f"images/{key}.jpg"
    caption = sample.get("caption") or ""
    rows: dict[str, list[dict[str, Any]]] = {"turns": [], "t2i": []}
    for t in sorted_turns(sample):
        negs = [n["text"] for n in t.get("negatives", [])]
        rows["turns"].append({"qry": f"{MUCO_IMAGE_PLACEHOLDER}\n{t['query']}", "qry_image_path": image,
                              "pos_text": t["target"], "pos_image_path": "", "negs": negs,
                              "neg_images": ["" for _ in negs], "qry_sentence": caption, "pos_sentence": "",
                              "key": key, "turn_type": t["type"], "i": t["i"]})
        if t["type"] == CAPTION_TURN:
            neg_keys = [n["source"] for n in sample.get("negative_images", [])]
            rows["t2i"].append({"qry": t["query"], "qry_image_path": "", "pos_text": MMEB_IMAGE_TARGET,
                                "pos_image_path": image, "negs": [MMEB_IMAGE_TARGET for _ in neg_keys],
                                "neg_images": [f"images/{k}.jpg" for k in neg_keys], "qry_sentence": "",
                                "pos_sentence": caption, "key": key, "turn_type": "t2i", "i": t["i"]})
    return rows


def _mmeb_schema(negatives: str | None):
    import pyarrow as pa

    fields = [("qry", pa.string()), ("qry_image_path", pa.string()), ("pos_text", pa.string()),
              ("pos_image_path", pa.string())]
    if negatives == "string":
        fields += [("neg_text", pa.string()), ("neg_image_path", pa.string())]
    elif negatives == "list":
        fields += [("neg_text", pa.list_(pa.string())), ("neg_image_path", pa.list_(pa.string()))]
    fields += [("qry_sentence", pa.string()), ("pos_sentence", pa.string()), ("key", pa.string()),
               ("turn_type", pa.string()), ("i", pa.int32())]
    return pa.schema(fields)


def _mmeb_readme(subsets: list[str]) -> str:
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: original\n    path: {s}/original-*.parquet\n"
                      for s in subsets)
    return (f"---\nconfigs:\n{configs}---\n\n# m3t-gen export (mmeb)\n\nOne row per turn with its hard negatives, "
            "in MMEB-train's columns. `<subset>/original-*.parquet`: VLM2Vec (`load_dataset(root, subset, "
            "split=\"original\")`, `image_dir` = this folder; `neg_text` is the hardest negative). "
            "`*/*_generated_sentence.parquet`: MuCo's loader (`--meta_folder` and `--image_folder` = this folder; "
            "`neg_text` lists every kept negative).\n")


@exporter("mmeb", None)
def export_mmeb(out_dir: Path, target: Path, options: ExportOptions) -> dict[str, Any]:
    from collections import Counter

    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {"turns": [], "t2i": []}
    exported: set[str] = set()
    left_out: Counter = Counter()
    for key, image, sample in iter_samples(out_dir, "shards"):
        if image is None:
            raise RunOutputError(f"{out_dir}: sample {key} has no JPEG in its tar")
        atomic_write_bytes(images / f"{key}.jpg", image)
        exported.add(key)
        for kind, found in _mmeb_rows(key, sample).items():
            rows[kind] += found
    wanted = {p[len("images/"):-len(".jpg")] for r in rows["t2i"] for p in r["neg_images"]} - exported
    for key, image in find_images(out_dir, wanted, ("filtered", "pool")):  # a negative refilter has since dropped
        atomic_write_bytes(images / f"{key}.jpg", image)
        exported.add(key)
    for r in rows["t2i"]:
        keep = [n for n, p in enumerate(r["neg_images"]) if p[len("images/"):-len(".jpg")] in exported]
        left_out["negative image not in the output"] += len(r["neg_images"]) - len(keep)
        r["negs"], r["neg_images"] = [r["negs"][n] for n in keep], [r["neg_images"][n] for n in keep]
    written = {}
    for kind, subset in MMEB_SUBSETS.items():
        found = rows[kind]
        vlm2vec = [dict(_without_negs(r), neg_text=r["negs"][0] if r["negs"] else "",
                        neg_image_path=r["neg_images"][0] if r["negs"] else "") for r in found]
        path = target / subset / "original-00000-of-00001.parquet"
        _write_parquet(path, vlm2vec, _mmeb_schema("string"))
        written[str(path)] = len(vlm2vec)
        muco = [dict(_without_negs(r), neg_text=r["negs"], neg_image_path=r["neg_images"]) for r in found if r["negs"]]
        path = target / subset / f"{subset}_generated_sentence.parquet"
        _write_parquet(path, muco, _mmeb_schema("list"))
        written[str(path)] = len(muco)
        bare = [_without_negs(r) for r in found if not r["negs"]]
        path = target / f"{subset}_no_negatives" / f"{subset}_no_negatives_generated_sentence.parquet"
        _write_parquet(path, bare, _mmeb_schema(None))
        written[str(path)] = len(bare)
    atomic_write_bytes(target / "README.md", _mmeb_readme(list(MMEB_SUBSETS.values())).encode())
    n_rows = sum(len(v) for v in rows.values())
    with_negs = sum(1 for v in rows.values() for r in v if r["negs"])
    return {"format": "mmeb", "rows": n_rows, "rows_with_negatives": with_negs, "path": str(target),
            "images": str(images), "written": written, "left_out": dict(left_out)}


def _without_negs(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("negs", "neg_images")}


# ----------------------------------------------------------------------------------------- cirr / fashioniq
def _triplet_images(out_dir: Path, triplets: list[dict[str, Any]], directory: Path, ext: str) -> None:
    """Each reference / target image once, as ``directory/<key>.<ext>`` (JPEG bytes as they are; PNG converted)."""
    wanted = {t[f] for t in triplets for f in ("image", "target_image")}
    directory.mkdir(parents=True, exist_ok=True)
    found = set()
    for key, image in find_images(out_dir, wanted):
        if ext == "png":
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(image)).save(buf, format="PNG")
            image = buf.getvalue()
        atomic_write_bytes(directory / f"{key}.{ext}", image)
        found.add(key)
    missing = sorted(wanted - found)
    if missing:
        raise RunOutputError(f"{out_dir}: triplets reference {len(missing)} image(s) found in none of the run's "
                             f"tars, e.g. {missing[0]!r}")


def _kept_triplets(out_dir: Path) -> list[dict[str, Any]]:
    if not triplet_files(out_dir):
        raise RunOutputError(NO_TRIPLETS)
    return list(iter_triplets(out_dir))


@exporter("cirr", None)
def export_cirr(out_dir: Path, target: Path, options: ExportOptions) -> dict[str, Any]:
    from collections import Counter

    triplets = _kept_triplets(out_dir)
    split = options.split
    _triplet_images(out_dir, triplets, target / split, "jpg")
    records, names = [], {}
    left_out: Counter = Counter()
    for n, t in enumerate(triplets):
        if not t["modifications"]:
            left_out["no kept modification text"] += 1
            continue
        for f in ("image", "target_image"):
            names[t[f]] = f"./{split}/{t[f]}.jpg"
        for text in (m["text"] for m in t["modifications"]):
            records.append({"pairid": len(records), "reference": t["image"], "target_hard": t["target_image"],
                            "target_soft": {t["target_image"]: 1.0}, "caption": text,
                            "img_set": {"id": n, "members": [t["image"], t["target_image"]]}})
    captions = target / "cirr" / "captions" / f"cap.rc2.{split}.json"
    splits = target / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    _write_json(captions, records)
    _write_json(splits, dict(sorted(names.items())))
    return {"format": "cirr", "rows": len(records), "path": str(target), "images": str(target / split),
            "written": {str(captions): len(records), str(splits): len(names)}, "left_out": dict(left_out)}


@exporter("fashioniq", None)
def export_fashioniq(out_dir: Path, target: Path, options: ExportOptions) -> dict[str, Any]:
    from collections import Counter

    triplets = _kept_triplets(out_dir)
    _triplet_images(out_dir, triplets, target / "images", options.image_ext)
    records, names = [], set()
    left_out: Counter = Counter()
    for t in triplets:
        texts = [m["text"] for m in t["modifications"]]
        if len(texts) < 2:
            left_out["fewer than 2 kept modification texts (FashionIQ records hold exactly 2)"] += 1
            continue
        if len(texts) % 2:
            left_out["odd modification text left over after pairing (texts, not triplets)"] += 1
        for a, b in zip(texts[0::2], texts[1::2]):
            records.append({"candidate": t["image"], "target": t["target_image"], "captions": [a, b]})
        names.update((t["image"], t["target_image"]))
    cat, split = options.category, options.split
    captions = target / "captions" / f"cap.{cat}.{split}.json"
    splits = target / "image_splits" / f"split.{cat}.{split}.json"
    _write_json(captions, records)
    _write_json(splits, sorted(names))
    return {"format": "fashioniq", "rows": len(records), "path": str(target), "images": str(target / "images"),
            "written": {str(captions): len(records), str(splits): len(names)}, "left_out": dict(left_out)}


# ----------------------------------------------------------------------------------------- mtcir
@exporter("mtcir", "train.jsonl")
def export_mtcir(out_dir: Path, target: Path, options: ExportOptions) -> dict[str, Any]:
    triplets = _kept_triplets(out_dir)  # before any directory is made; also validates every line
    images = _make_dirs(target)
    _triplet_images(out_dir, triplets, images, "jpg")
    count = 0
    with staged_file(target) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for t in iter_triplets(out_dir):
            fh.write(json.dumps({"id": t["id"], "image": f"images/{t['image']}.jpg",
                                 "target_image": f"images/{t['target_image']}.jpg",
                                 "modifications": [{"category": m.get("category"), "text": m["text"]}
                                                   for m in t["modifications"]]}, ensure_ascii=False) + "\n")
            count += 1
    return {"format": "mtcir", "rows": count, "path": str(target), "images": str(images),
            "written": {str(target): count}, "left_out": {}}
