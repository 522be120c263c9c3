"""Generation efficiency (issue 7): output tokens/s of the dialogue stage inside a Ray Data pipeline divided by
output tokens/s of the same engine run standalone on the same prompts and settings, in one run.

    python bench/generation_efficiency.py --backend vllm [--small 128 --large 512] [--in-flight 1 2] [--repeats 2]
    python bench/generation_efficiency.py --backend transformers --small 64 --large 256 --batch 32

Engine start-up must not hide in the figures: each side is timed at two sizes and the ratio uses the marginal
cost, (T_large - T_small) / (tokens_large - tokens_small). Standalone: the backend's engine built once in this
process and driven through its own API (vLLM: one LLM.chat call over all prompts, the engine's best case;
transformers: the backend's batched generate). Pipeline: a fresh Ray Data pipeline per size and per
``batches_in_flight`` setting: rows -> DialogueStage actor (the project's stage: template, schema, validation,
and for vLLM its feeder thread) -> driver, timed end to end including the actor's engine start, which the
two-size difference cancels.
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


def config(backend: str, batch: int, in_flight: int, actor_cpus: float):
    from m3t_gen.config import load_config

    sets = [f"dialogue.resources.batch_size={batch}", f"dialogue.resources.batches_in_flight={in_flight}",
            f"dialogue.resources.num_cpus={actor_cpus}", "dialogue.max_attempts=1", "ray.progress=false"]
    if backend == "transformers":
        sets += ["dialogue.model.backend=transformers", "dialogue.model.options={}"]
    return load_config(ROOT / "pipelines" / "smoke.yaml", sets)


def standalone(cfg, n_small: int, n_large: int) -> dict:
    """The same backend engine the stage uses, driven directly: generate() over every prompt at once."""
    from m3t_gen.pipeline import make_context
    from m3t_gen.stages.dialogue import DialogueStage

    stage = DialogueStage(make_context(cfg))  # builds the engine once; we drive it directly below
    generate = _bare_engine(stage.backend)
    out = {}
    generate(_requests(stage, rows_for(8)))  # warm-up
    for n in (n_small, n_large):
        reqs = _requests(stage, rows_for(n))
        t = time.perf_counter()
        tokens = generate(reqs)
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


def _summary(runs: list[dict]) -> dict:
    tok = [x["tok_s"] for x in runs]
    return {"median": round(statistics.median(tok), 1), "min": round(min(tok), 1), "max": round(max(tok), 1),
            "runs": [{k: (round(v[0], 2), v[1]) if isinstance(v, tuple) else round(v, 1) for k, v in x.items()}
                     for x in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
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
            cfg = config(args.backend, args.batch, n, args.actor_cpus)
            small, large = in_pipeline(cfg, args.small), in_pipeline(cfg, args.large)
            pipe[n].append({"small": small, "large": large, "tok_s": marginal(small, large)})
    ray.shutdown()  # free the cores and memory for the standalone engine
    cfg = config(args.backend, args.batch, 1, args.actor_cpus)
    alone = []
    for _ in range(args.repeats):
        sa = standalone(cfg, args.small, args.large)
        alone.append({"small": sa[args.small], "large": sa[args.large], "tok_s": marginal(sa[args.small], sa[args.large])})
    a = _summary(alone)
    print(json.dumps({
        "bench": "generation_efficiency", "backend": args.backend, "sizes": [args.small, args.large],
        "batch_size": args.batch, "actor_cpus": args.actor_cpus, "max_tokens": cfg.dialogue.sampling.max_tokens,
        "standalone_tok_s": a,
        "pipeline_tok_s": {f"batches_in_flight={n}": _summary(runs) for n, runs in pipe.items()},
        "efficiency": {f"batches_in_flight={n}": round(_summary(runs)["median"] / a["median"], 3)
                       for n, runs in pipe.items()},
    }))


if __name__ == "__main__":
    main()
