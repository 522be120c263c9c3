"""Generation efficiency (issues 7, 11, 27): output tokens/s of a generation stage (dialogue, or caption with images
in) inside a Ray Data pipeline divided by output tokens/s of the same engine run standalone on the same prompts
and settings, in one run.

    python bench/generation_efficiency.py --backend vllm [--small 128 --large 512] [--in-flight 1 2] [--repeats 2]
    python bench/generation_efficiency.py --backend transformers --small 64 --large 256 --batch 32
    python bench/generation_efficiency.py --stage caption --backend vllm --small 256 --large 1024 --batch 256
    python bench/generation_efficiency.py --stage judge --backend vllm --small 256 --large 1024 --batch 256
    python bench/generation_efficiency.py --stage caption judge triplet_judge --sides bare ours raylm \
        --in-flight 1 --repeats 2          # issue 27: three sides, interleaved, one invocation

Three sides (``--sides``), measured on the same rows and interleaved within each repeat (the order rotates
per repeat, so drift on the machine hits each alike): ``bare`` (the engine alone, as below), ``ours`` (the
stage in Ray Data, as below) and ``raylm``: Ray Data's own LLM processor (``ray.data.llm.build_processor``,
vLLMEngineProcessorConfig) run the way that works with vLLM 0.32 on this CPU build. Its documented image path does
not: its prepare_multimodal_stage imports vllm.entrypoints.chat_utils, which vLLM 0.32 no longer has, and a
per-request ``seed`` fails in its async engine on CPU. So its chat-template, tokenize, detokenize and
multimodal stages are off; its ``preprocess`` (a Ray Data map of its own, on another core) decodes the images
and renders the model's chat template (the HF processor's ``apply_chat_template``) over our template's text, and
hands the engine ``prompt`` + ``multimodal_data={"image": PIL}`` with the same sampling settings and JSON schema
but no seed; the engine has our backend's engine arguments, one CPU bundle, one replica.
triplet_judge: the CIR judge (two images per request: reference and target, read by seek from a pool tar as in a
run) over pairs with the smoke config's number of modification texts.

Caption: the vLLM engine with the tiny Qwen2.5-VL of pipelines/smoke.yaml, one image per request (distinct crops
of the bundled photos, at most 512 px), the real caption template; vLLM renders and processes each image on
both sides. Judge: the same images, each with a written 7-turn dialogue, the real judge template and its
verdict schema (one call per sample; answerability off, so both sides send the same requests).

Engine start-up must not hide in the figures: each side is timed at two sizes and the ratio uses the marginal
cost, (T_large - T_small) / (tokens_large - tokens_small). Standalone: the backend's engine built once in this
process and driven through its own API (vLLM: one LLM.chat call over all prompts, the engine's best case;
transformers: the backend's batched generate). Pipeline: a fresh Ray Data pipeline per size and per
``batches_in_flight`` setting: rows (in blocks of one batch) -> DialogueStage actor (the project's stage:
template, schema, validation, and for vLLM its feeder thread) -> driver, timed end to end including the
actor's engine start, which the two-size difference cancels.
The two sizes use different rows (on both sides): vLLM's prefix and image caches must not serve the large
size from what the small one left behind.
Prompts: the real dialogue template over distinct captions; sampling from pipelines/smoke.yaml; JSON schema on.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def image_rows_for(n: int, start: int = 0) -> list[dict]:
    """n distinct images (rows start.. start+n-1): crops of the bundled smoke photos (different boxes per row),
    JPEG, at most 512 px."""
    import io
    import tarfile

    from PIL import Image

    from m3t_gen.rows import new_row

    photos = []
    for tar_path in sorted((ROOT / "data" / "smoke").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    try:
                        im = Image.open(io.BytesIO(tar.extractfile(m).read()))
                        im.load()
                    except OSError:
                        continue  # the shard's deliberately truncated JPEG
                    if min(im.size) >= 256:
                        photos.append(im.convert("RGB"))
    rows = []
    for i in range(start, start + n):
        im = photos[i % len(photos)]
        w, h = im.size
        f = 0.6 + 0.4 * ((i * 37) % 97) / 97  # crop share of the photo, per row
        cw, ch = int(w * f), int(h * f)
        x, y = (i * 13) % max(1, w - cw), (i * 7) % max(1, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
        crop.thumbnail((512, 512))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        rows.append(new_row(key=f"c_{i:06d}", shard="c", width=crop.size[0], height=crop.size[1], text="",
                            image=buf.getvalue()))
    return rows


def rows_for(n: int, start: int = 0) -> list[dict]:
    from m3t_gen.rows import new_row

    words = "red blue green small large wooden metal old new bright dark striped".split()
    things = "car dog cat house tree boat chair lamp table bicycle bird cup".split()
    return [new_row(key=f"g_{i:06d}", shard="g", width=640, height=480, text="",
                    caption=f"A {words[i % 12]} {things[(i // 12) % 12]} next to a {words[(i // 7) % 12]} "
                            f"{things[(i // 3) % 12]} in a room, photo {i}.") for i in range(start, start + n)]


def judge_rows_for(n: int, start: int = 0) -> list[dict]:
    """Image rows, each with a dialogue of the default mix to judge (distinct texts per row)."""
    from m3t_gen.turns import DEFAULT_MIX, turn_plan

    rows = image_rows_for(n, start)
    for i, row in enumerate(rows, start):
        row["caption"] = f"a photo with things in it, number {i}"
        row["turns"] = [{"type": t["type"], "query": f"what is at place {j} of photo {i}?",
                         "target": f"thing {(i * 7 + j) % 13}"} for j, t in enumerate(turn_plan(DEFAULT_MIX))]
    return rows


_POOL: dict[str, str] = {}  # the pool tar of the triplet_judge rows, made once per invocation


def pair_rows_for(n: int, start: int = 0) -> list[dict]:
    """CIR pairs as the triplet judge gets them: both images in a pool tar (read by seek, as in a run), two
    captions and the smoke config's three modification texts (distinct per pair)."""
    import tarfile
    import tempfile

    from m3t_gen.rows import OK, PAIR_SCHEMA

    images = image_rows_for(n + 1, start)
    if "dir" not in _POOL:
        _POOL["dir"] = tempfile.mkdtemp(prefix="bench_pool_")
    path = f"{_POOL['dir']}/pool_{start}_{n}.tar"
    with tarfile.open(path, "w") as tar:
        import io
        for r in images:
            info = tarfile.TarInfo(f"{r['key']}.jpg")
            info.size = len(r["image"])
            tar.addfile(info, io.BytesIO(r["image"]))
    with tarfile.open(path) as tar:
        where = {m.name[:-4]: f"{path}:{m.offset_data}:{m.size}" for m in tar.getmembers()}
    rows = []
    for i in range(n):
        ref, tgt = images[i], images[i + 1]
        row = dict.fromkeys(PAIR_SCHEMA.names)
        row.update(key=f"{ref['key']}__{tgt['key']}", shard="p", ref_key=ref["key"], tgt_key=tgt["key"],
                   ref_caption=f"a photo with things in it, number {start + i}",
                   tgt_caption=f"another photo, number {start + i + 1}", ref_image=where[ref["key"]],
                   tgt_image=where[tgt["key"]], similarity=0.8, rank=1, ref_index=i, tgt_index=i + 1,
                   status=OK, timings="{}",
                   modifications=[{"category": "add", "text": f"add thing {(start + i + j) % 17} at place {j}"}
                                  for j in range(3)])
        rows.append(row)
    return rows


def _stage(name: str):
    """(stage class, rows builder) of the stage under test."""
    from m3t_gen.stages.caption import CaptionStage
    from m3t_gen.stages.dialogue import DialogueStage
    from m3t_gen.stages.judge import JudgeStage, TripletJudgeStage

    return {"dialogue": (DialogueStage, rows_for), "caption": (CaptionStage, image_rows_for),
            "judge": (JudgeStage, judge_rows_for), "triplet_judge": (TripletJudgeStage, pair_rows_for)}[name]


def _schema(stage, row):
    """The JSON schema the stage decodes this row's request with."""
    from m3t_gen.stages.judge import verdict_decoding_schema

    if stage.name in ("judge", "triplet_judge"):
        return verdict_decoding_schema(len(row[stage.items]), stage.cfg.max_text_chars)
    return getattr(stage, "decoding_schema", None)


def config(stage: str, backend: str, batch: int, in_flight: int, actor_cpus: float):
    from m3t_gen.config import load_config

    section = _stage(stage)[0].section
    sets = [f"{section}.resources.batch_size={batch}", f"{section}.resources.batches_in_flight={in_flight}",
            f"{section}.resources.num_cpus={actor_cpus}", f"{section}.max_attempts=1", "ray.progress=false"]
    if stage == "judge":
        sets.append("judge.answerability=false")
    if backend == "transformers":
        sets += [f"{section}.model.backend=transformers", f"{section}.model.options={{}}"]
    return load_config(ROOT / "pipelines" / "smoke.yaml", sets)


def sizes(n_small: int, n_large: int) -> list[tuple[int, int]]:
    """(rows, first row) of each size. The sizes share no row: vLLM caches prefixes and processed images, so an
    engine that saw the small size's rows would serve their repeats in the large one faster, and only the
    standalone side (one engine for both sizes) would gain from it."""
    return [(n_small, 0), (n_large, n_small)]


def standalone(cfg, stage_name: str, n_small: int, n_large: int) -> dict:
    """The same backend engine the stage uses, driven directly: generate() over every prompt at once."""
    from m3t_gen.run.pipeline import make_context

    stage_cls, make_rows = _stage(stage_name)
    stage = stage_cls(make_context(cfg))  # builds the engine once; we drive it directly below
    generate = _bare_engine(stage.backend)
    out = {}
    generate(_requests(stage, make_rows(8, start=n_small + n_large)))  # warm-up, on rows of its own
    for n, start in sizes(n_small, n_large):
        rows = make_rows(n, start)
        t = time.perf_counter()
        # Building the requests is timed on this side too: rendering the template and, for the caption stage,
        # decoding each JPEG, the work any caller of the engine does with images as they arrive.
        tokens = generate(_requests(stage, rows))
        out[n] = (time.perf_counter() - t, tokens)
    stage.backend.close()
    return out


def _bare_engine(backend):
    """requests -> output tokens, with nothing of the project between the caller and the engine's own API."""
    if backend.name == "vllm":
        from m3t_gen.backends.vllm_backend import to_sampling_params, to_vllm_messages

        backend.feeder.stop()  # hand the engine back to this thread: one LLM.chat over all prompts
        llm = backend.llm

        def generate(reqs):
            outs = llm.chat([to_vllm_messages(r.messages) for r in reqs], [to_sampling_params(r) for r in reqs],
                            use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)
        return generate
    # transformers: generate() is the engine call itself (batched model.generate under one lock)
    return lambda reqs: sum(r.output_tokens for r in backend.generate(reqs))


def _requests(stage, rows):
    from m3t_gen.backends.base import GenerationRequest
    from m3t_gen.seeds import derive_seed

    s = stage.cfg.sampling
    return [GenerationRequest(messages=stage.messages(r), seed=derive_seed(0, stage.name, r["key"]),
                              max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              json_schema=_schema(stage, r)) for r in rows]


def in_pipeline(cfg, stage_name: str, n: int, start: int, block_rows: int = 256) -> tuple[float, int]:
    import ray

    from m3t_gen.run.pipeline import make_context
    from m3t_gen.run.recipe import apply_stages
    from m3t_gen.rows import to_table

    stage_cls, make_rows = _stage(stage_name)
    ctx = make_context(cfg)
    rows = make_rows(n, start)  # built before the clock starts, as on the standalone side
    t = time.perf_counter()
    # Rows arrive in blocks of one batch, as a run's read stage hands them on (and as Ray Data LLM's side gets them
    # from from_items): one block of every row made the whole size one actor task, whose time varied by ~16 %.
    ds = ray.data.from_arrow([to_table(rows[i:i + block_rows], stage_cls.row_schema)
                              for i in range(0, len(rows), block_rows)])
    ds = apply_stages(ds, [stage_cls], cfg, ctx)
    tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for tok in batch.column("tokens").to_pylist():
            tokens += json.loads(tok or "{}").get(stage_name, 0)
    return time.perf_counter() - t, tokens


def raylm_preprocess(row: dict, model_dir: str, sampling: dict) -> dict:
    """Ray Data LLM's preprocess (a Ray Data map of its own): the images decoded, the model's chat template
    rendered over our template's text; the engine gets a ready prompt and the images."""
    import io

    import transformers
    from PIL import Image

    # The HF processor loads once per worker process: this function travels by value (it is in __main__), so
    # its cache lives on a module the worker imports (build_processor wraps a class preprocess in a function).
    cache = transformers.__dict__.setdefault("_bench_raylm_processor", {})
    if model_dir not in cache:
        cache[model_dir] = transformers.AutoProcessor.from_pretrained(model_dir)
    images = []
    for b in row["images"]:
        im = Image.open(io.BytesIO(b))
        im.load()
        images.append(im.convert("RGB"))
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": row["text"]}]
    prompt = cache[model_dir].apply_chat_template([{"role": "user", "content": content}],
                                                add_generation_prompt=True, tokenize=False)
    params = dict(sampling)
    if row["schema"]:
        params["structured_outputs"] = {"json": json.loads(row["schema"])}
    return {"prompt": prompt, "multimodal_data": {"image": images if len(images) > 1 else images[0]},
            "sampling_params": params}


def _raylm_rows(cfg, stage_name: str, rows: list[dict]) -> list[dict]:
    """Per row what Ray Data LLM's preprocess needs: our template's text, the image bytes, the JSON schema."""
    from types import SimpleNamespace

    from m3t_gen.stages.modify import load_pool_image  # noqa: F401  (the pool's reader, for its bytes below)
    from m3t_gen.storage.store import read_member
    from m3t_gen.text.templates import load_template

    stage_cls = _stage(stage_name)[0]
    section = stage_cls.settings(cfg)
    stage = SimpleNamespace(name=stage_name, cfg=section, items=getattr(stage_cls, "items", None))
    template = load_template(section.template, cfg.base_dir)
    fields = stage_cls.fields  # instance methods that read nothing of the instance but cfg
    out = []
    for r in rows:
        if stage_name == "triplet_judge":
            images = [read_member(*(lambda p, o, n: (p, int(o), int(n)))(*r[k].rsplit(":", 2)))
                      for k in ("ref_image", "tgt_image")]
        else:
            images = [r["image"]]
        schema = _schema(stage, r)
        out.append({"text": template.render(**fields(stage, r)), "images": images,
                    "schema": json.dumps(schema) if schema else None})
    return out


def raylm(cfg, stage_name: str, n: int, start: int, batch: int) -> tuple[float, int]:
    """Ray Data LLM's vLLM processor over the same rows: (seconds, output tokens), engine start included."""
    from types import SimpleNamespace

    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from m3t_gen.backends.vllm_backend import VLLMBackend, VLLMOptions
    from m3t_gen.models import resolve

    stage_cls, make_rows = _stage(stage_name)
    section = stage_cls.settings(cfg)
    spec = section.model
    engine = VLLMBackend._build_kwargs(SimpleNamespace(options=VLLMOptions.model_validate(spec.options)), spec)
    model_dir = str(engine.pop("model"))
    s = section.sampling
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}  # no seed: see above
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_dir, engine_kwargs=engine, batch_size=batch, concurrency=1,
            log_engine_metrics=False, placement_group_config={"bundles": [{"CPU": 1}]},
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
            prepare_multimodal_stage=False),
        preprocess=functools.partial(raylm_preprocess, model_dir=model_dir, sampling=sampling),
        postprocess=lambda row: {"tokens": row["num_generated_tokens"]})
    rows = _raylm_rows(cfg, stage_name, make_rows(n, start))  # before the clock, as our rows are
    t = time.perf_counter()
    tokens = sum(b["tokens"].sum() for b in processor(ray.data.from_items(rows)).iter_batches(
        batch_size=None, batch_format="numpy"))
    return time.perf_counter() - t, int(tokens)


def marginal(small: tuple[float, int], large: tuple[float, int]) -> float:
    return (large[1] - small[1]) / (large[0] - small[0])


def _summary(runs: list[dict]) -> dict:
    tok = [x["tok_s"] for x in runs]
    return {"median": round(statistics.median(tok), 1), "min": round(min(tok), 1), "max": round(max(tok), 1),
            "runs": [{k: (round(v[0], 2), v[1]) if isinstance(v, tuple) else round(v, 1) for k, v in x.items()}
                     for x in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", nargs="+", default=["dialogue"],
                    choices=["dialogue", "caption", "judge", "triplet_judge"])
    ap.add_argument("--sides", nargs="+", default=["bare", "ours"], choices=["bare", "ours", "raylm"],
                    help="bare: the engine alone; ours: the stage in Ray Data; raylm: Ray Data LLM's processor")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--small", type=int, default=128)
    ap.add_argument("--large", type=int, nargs="+", default=[512],
                    help="the large size; one value per --stage when they differ")
    ap.add_argument("--batch", type=int, default=256, help="rows per map_batches call (the stage's batch_size)")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2],
                    help="resources.batches_in_flight settings to measure (1: one batch at a time)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--actor-cpus", type=float, default=2,
                    help="the stage actor's num_cpus. Ray sets OMP_NUM_THREADS from it (1 below 1 CPU), so the "
                         "default gives the actor the threads the standalone process has (the whole 2-vCPU box)")
    ap.add_argument("--decode-cpus", type=float, nargs="+", default=[None],
                    help="resources.decode_cpus settings of the stage to measure, side by side like --in-flight (0: "
                         "the actor decodes its images; default: the config's). With --actor-cpus 2 on a 2-CPU "
                         "Ray, the decode tasks need their own share: the actor gets 2 - decode_cpus")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    larges = dict(zip(args.stage, args.large * len(args.stage) if len(args.large) == 1 else args.large))
    for stage in args.stage:
        n_small, n_large = args.small, larges[stage]
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            # every side in every repeat; the order rotates so that drift on the machine hits each alike
            order = [(side, n, dc) for side in args.sides
                     for n in (args.in_flight if side == "ours" else [None])
                     for dc in (args.decode_cpus if side == "ours" else [None])]
            order = order[rep % len(order):] + order[:rep % len(order)]
            for side, n, dc in order:
                cfg = config(stage, args.backend, args.batch, n or 1, args.actor_cpus)
                if dc is not None:
                    cfg = cfg.model_copy(deep=True)
                    _stage(stage)[0].settings(cfg).resources.decode_cpus = dc
                res = _stage(stage)[0].settings(cfg).resources
                if side == "ours" and res.decode_cpus > 0 and _stage(stage)[0].images_per_request(cfg):
                    res.num_cpus = min(res.num_cpus, 2 - res.decode_cpus)  # room for the decode tasks
                if side == "bare":
                    sa = standalone(cfg, stage, n_small, n_large)
                    small, large = sa[n_small], sa[n_large]
                elif side == "ours":
                    small, large = (in_pipeline(cfg, stage, rows, start, args.batch)
                                    for rows, start in sizes(n_small, n_large))
                else:
                    small, large = (raylm(cfg, stage, rows, start, args.batch)
                                    for rows, start in sizes(n_small, n_large))
                key = side if side != "ours" else f"ours batches_in_flight={n}" + (
                    f" decode_cpus={dc}" if len(args.decode_cpus) > 1 else "")
                runs.setdefault(key, []).append({"repeat": rep, "small": small, "large": large,
                                                 "tok_s": marginal(small, large)})
                print(json.dumps({"progress": stage, "side": key, "repeat": rep,
                                  "tok_s": round(runs[key][-1]["tok_s"], 1)}), flush=True)
        sums = {k: _summary(v) for k, v in runs.items()}
        bare = sums.get("bare", {}).get("median")
        cfg = config(stage, args.backend, args.batch, 1, args.actor_cpus)
        print(json.dumps({
            "bench": "generation_efficiency", "stage": stage, "backend": args.backend,
            "model": _stage(stage)[0].settings(cfg).model.model, "sizes": [n_small, n_large],
            "batch_size": args.batch, "actor_cpus": args.actor_cpus, "decode_cpus": args.decode_cpus,
            "max_tokens": _stage(stage)[0].settings(cfg).sampling.max_tokens,
            "tok_s": sums,
            "of_bare": {k: round(v["median"] / bare, 3) for k, v in sums.items() if bare and k != "bare"},
        }), flush=True)


if __name__ == "__main__":
    main()
