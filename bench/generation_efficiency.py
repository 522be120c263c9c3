"""Generation efficiency (issue 7): output tokens/s of the dialogue stage inside a Ray Data pipeline divided by
output tokens/s of the same engine run standalone on the same prompts and settings, in one run.

    python bench/generation_efficiency.py --backend vllm [--small 128 --large 512] [--repeats 2]
    python bench/generation_efficiency.py --backend transformers --small 16 --large 64

Engine start-up must not hide in the figures: each side is timed at two sizes and the ratio uses the marginal
cost, (T_large - T_small) / (tokens_large - tokens_small). Standalone: the backend's engine built once in this
process, generate() over all prompts (vLLM: one LLM.chat call, the engine's best case). Pipeline: a fresh Ray
Data pipeline per size: rows -> DialogueStage actor (the project's stage: template, schema, validation) ->
driver, timed end to end including the actor's engine start, which the two-size difference cancels.
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


def rows_for(n: int) -> list[dict]:
    from m3t_gen.rows import new_row

    words = "red blue green small large wooden metal old new bright dark striped".split()
    things = "car dog cat house tree boat chair lamp table bicycle bird cup".split()
    return [new_row(key=f"g_{i:06d}", shard="g", width=640, height=480, text="",
                    caption=f"A {words[i % 12]} {things[(i // 12) % 12]} next to a {words[(i // 7) % 12]} "
                            f"{things[(i // 3) % 12]} in a room, photo {i}.") for i in range(n)]


def config(backend: str, batch: int):
    from m3t_gen.config import load_config

    sets = [f"dialogue.resources.batch_size={batch}", "dialogue.max_attempts=1", "ray.progress=false"]
    if backend == "transformers":
        sets += ["dialogue.model.backend=transformers", "dialogue.model.options={}"]
    return load_config(ROOT / "pipelines" / "smoke.yaml", sets)


def standalone(cfg, n_small: int, n_large: int) -> dict:
    """The same backend engine the stage uses, driven directly: generate() over every prompt at once."""
    from m3t_gen.pipeline import make_context
    from m3t_gen.stages.dialogue import DialogueStage

    stage = DialogueStage(make_context(cfg))  # builds the engine once; we call the backend directly below
    out = {}
    stage.backend.generate(_requests(stage, rows_for(8)))  # warm-up
    for n in (n_small, n_large):
        reqs = _requests(stage, rows_for(n))
        t = time.perf_counter()
        results = stage.backend.generate(reqs)
        out[n] = (time.perf_counter() - t, sum(r.output_tokens for r in results))
    return out


def _requests(stage, rows):
    from m3t_gen.backends.base import GenerationRequest
    from m3t_gen.seeds import derive_seed

    s = stage.cfg.sampling
    return [GenerationRequest(messages=stage._messages(r), seed=derive_seed(0, "dialogue", r["key"]),
                              max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              json_schema=stage.decoding_schema) for r in rows]


def in_pipeline(cfg, n: int) -> tuple[float, int]:
    import ray

    from m3t_gen.pipeline import apply_stages, make_context
    from m3t_gen.rows import to_table
    from m3t_gen.stages.dialogue import DialogueStage

    ctx = make_context(cfg)
    t = time.perf_counter()
    ds = ray.data.from_arrow(to_table(rows_for(n)))
    ds = apply_stages(ds, [DialogueStage], cfg, ctx)
    tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for tok in batch.column("tokens").to_pylist():
            tokens += json.loads(tok or "{}").get("dialogue", 0)
    return time.perf_counter() - t, tokens


def marginal(small: tuple[float, int], large: tuple[float, int]) -> float:
    return (large[1] - small[1]) / (large[0] - small[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--small", type=int, default=128)
    ap.add_argument("--large", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256, help="rows per map_batches call (the stage's batch_size)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ray

    cfg = config(args.backend, args.batch)
    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pipe, alone = [], []
    for _ in range(args.repeats):
        small, large = in_pipeline(cfg, args.small), in_pipeline(cfg, args.large)
        pipe.append({"small": small, "large": large, "tok_s": marginal(small, large)})
    ray.shutdown()  # free the cores and memory for the standalone engine
    for _ in range(args.repeats):
        sa = standalone(cfg, args.small, args.large)
        alone.append({"small": sa[args.small], "large": sa[args.large], "tok_s": marginal(sa[args.small], sa[args.large])})
    p = statistics.median(x["tok_s"] for x in pipe)
    a = statistics.median(x["tok_s"] for x in alone)
    print(json.dumps({
        "bench": "generation_efficiency", "backend": args.backend, "sizes": [args.small, args.large],
        "batch_size": args.batch, "max_tokens": cfg.dialogue.sampling.max_tokens,
        "pipeline_tok_s": {"median": round(p, 1), "min": round(min(x["tok_s"] for x in pipe), 1),
                           "max": round(max(x["tok_s"] for x in pipe), 1)},
        "standalone_tok_s": {"median": round(a, 1), "min": round(min(x["tok_s"] for x in alone), 1),
                             "max": round(max(x["tok_s"] for x in alone), 1)},
        "efficiency": round(p / a, 3),
        "runs": {"pipeline": [{k: (round(v[0], 2), v[1]) if isinstance(v, tuple) else round(v, 1)
                               for k, v in x.items()} for x in pipe],
                 "standalone": [{k: (round(v[0], 2), v[1]) if isinstance(v, tuple) else round(v, 1)
                                 for k, v in x.items()} for x in alone]},
    }))


if __name__ == "__main__":
    main()
