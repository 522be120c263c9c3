"""Generation efficiency (issues 7, 11): output tokens/s of a generation stage (dialogue, or caption with images
in) inside a Ray Data pipeline divided by output tokens/s of the same engine run standalone on the same prompts
and settings, in one run.

    python bench/generation_efficiency.py --backend vllm [--small 128 --large 512] [--in-flight 1 2] [--repeats 2]
    python bench/generation_efficiency.py --backend transformers --small 64 --large 256 --batch 32
    python bench/generation_efficiency.py --stage caption --backend vllm --small 256 --large 1024 --batch 256
    python bench/generation_efficiency.py --stage judge --backend vllm --small 256 --large 1024 --batch 256

Caption: the vLLM engine with the tiny Qwen2.5-VL of pipelines/smoke.yaml, one image per request (distinct crops
of the bundled photos, at most 512 px), the real caption template; vLLM renders and processes each image on
both sides. Judge: the same images, each with a written 7-turn dialogue, the real judge template and its
verdict schema (one call per sample; answerability off, so both sides send the same requests).

Engine start-up must not hide in the figures: each side is timed at two sizes and the ratio uses the marginal
cost, (T_large - T_small) / (tokens_large - tokens_small). Standalone: the backend's engine built once in this
process and driven through its own API (vLLM: one LLM.chat call over all prompts, the engine's best case;
transformers: the backend's batched generate). Pipeline: a fresh Ray Data pipeline per size and per
``batches_in_flight`` setting: rows -> DialogueStage actor (the project's stage: template, schema, validation,
and for vLLM its feeder thread) -> driver, timed end to end including the actor's engine start, which the
two-size difference cancels.
The two sizes use different rows (on both sides): vLLM's prefix and image caches must not serve the large
size from what the small one left behind.
Prompts: the real dialogue template over distinct captions; sampling from pipelines/smoke.yaml; JSON schema on.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
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


def _stage(name: str):
    """(stage class, rows builder) of the stage under test."""
    from m3t_gen.stages.caption import CaptionStage
    from m3t_gen.stages.dialogue import DialogueStage
    from m3t_gen.stages.judge import JudgeStage

    return {"dialogue": (DialogueStage, rows_for), "caption": (CaptionStage, image_rows_for),
            "judge": (JudgeStage, judge_rows_for)}[name]


def _schema(stage, row):
    """The JSON schema the stage decodes this row's request with."""
    from m3t_gen.stages.judge import verdict_decoding_schema

    if stage.name == "judge":
        return verdict_decoding_schema(len(row["turns"]), stage.cfg.max_text_chars)
    return getattr(stage, "decoding_schema", None)


def config(stage: str, backend: str, batch: int, in_flight: int, actor_cpus: float):
    from m3t_gen.config import load_config

    sets = [f"{stage}.resources.batch_size={batch}", f"{stage}.resources.batches_in_flight={in_flight}",
            f"{stage}.resources.num_cpus={actor_cpus}", f"{stage}.max_attempts=1", "ray.progress=false"]
    if stage == "judge":
        sets.append("judge.answerability=false")
    if backend == "transformers":
        sets += [f"{stage}.model.backend=transformers", f"{stage}.model.options={{}}"]
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
    return [GenerationRequest(messages=stage._messages(r), seed=derive_seed(0, stage.name, r["key"]),
                              max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              json_schema=_schema(stage, r)) for r in rows]


def in_pipeline(cfg, stage_name: str, n: int, start: int) -> tuple[float, int]:
    import ray

    from m3t_gen.run.pipeline import make_context
    from m3t_gen.run.recipe import apply_stages
    from m3t_gen.rows import to_table

    stage_cls, make_rows = _stage(stage_name)
    ctx = make_context(cfg)
    rows = make_rows(n, start)  # built before the clock starts, as on the standalone side
    t = time.perf_counter()
    ds = ray.data.from_arrow(to_table(rows))
    ds = apply_stages(ds, [stage_cls], cfg, ctx)
    tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for tok in batch.column("tokens").to_pylist():
            tokens += json.loads(tok or "{}").get(stage_name, 0)
    return time.perf_counter() - t, tokens


def marginal(small: tuple[float, int], large: tuple[float, int]) -> float:
    return (large[1] - small[1]) / (large[0] - small[0])


def _summary(runs: list[dict]) -> dict:
    tok = [x["tok_s"] for x in runs]
    return {"median": round(statistics.median(tok), 1), "min": round(min(tok), 1), "max": round(max(tok), 1),
            "runs": [{k: (round(v[0], 2), v[1]) if isinstance(v, tuple) else round(v, 1) for k, v in x.items()}
                     for x in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="dialogue", choices=["dialogue", "caption", "judge"])
    ap.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--small", type=int, default=128)
    ap.add_argument("--large", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256, help="rows per map_batches call (the stage's batch_size)")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2],
                    help="dialogue.resources.batches_in_flight settings to measure (1: one batch at a time)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--actor-cpus", type=float, default=2,
                    help="the stage actor's num_cpus. Ray sets OMP_NUM_THREADS from it (1 below 1 CPU), so the "
                         "default gives the actor the threads the standalone process has (the whole 2-vCPU box)")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pipe: dict[int, list[dict]] = {n: [] for n in args.in_flight}
    for _ in range(args.repeats):  # interleave the settings so that drift on the machine hits each alike
        for n in args.in_flight:
            cfg = config(args.stage, args.backend, args.batch, n, args.actor_cpus)
            small, large = (in_pipeline(cfg, args.stage, rows, start)
                            for rows, start in sizes(args.small, args.large))
            pipe[n].append({"small": small, "large": large, "tok_s": marginal(small, large)})
    ray.shutdown()  # free the cores and memory for the standalone engine
    cfg = config(args.stage, args.backend, args.batch, 1, args.actor_cpus)
    alone = []
    for _ in range(args.repeats):
        sa = standalone(cfg, args.stage, args.small, args.large)
        alone.append({"small": sa[args.small], "large": sa[args.large], "tok_s": marginal(sa[args.small], sa[args.large])})
    a = _summary(alone)
    print(json.dumps({
        "bench": "generation_efficiency", "stage": args.stage, "backend": args.backend,
        "model": getattr(cfg, args.stage).model.model, "sizes": [args.small, args.large],
        "batch_size": args.batch, "actor_cpus": args.actor_cpus,
        "max_tokens": getattr(cfg, args.stage).sampling.max_tokens,
        "standalone_tok_s": a,
        "pipeline_tok_s": {f"batches_in_flight={n}": _summary(runs) for n, runs in pipe.items()},
        "efficiency": {f"batches_in_flight={n}": round(_summary(runs)["median"] / a["median"], 3)
                       for n, runs in pipe.items()},
    }))


if __name__ == "__main__":
    main()
