"""The recipe: every stage in pipeline order, each declared once by its class (m3t_gen/stages/*.py), and how a
list of stages becomes Ray Data operators. The pipeline, the CIR pass, lineage, `plan` and the card read the
stages from here; adding a stage is its file, its place in one of these lists, and a test.

    sample pass: read -> dedupe -> caption -> embed -> dialogue -> reward -> [judge] -> filter   (one row per image)
    CIR pass:    pairs -> modify -> triplet_reward -> [triplet_judge] -> triplet_filter     (one row per image pair)
    [optional]: on when its config section is set
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from typing import Any

from m3t_gen.config import PipelineConfig
from m3t_gen.run.artefacts import StageRow
from m3t_gen.stages.base import RunContext, Stage
from m3t_gen.stages.caption import CaptionStage
from m3t_gen.stages.dedupe import DedupeStage
from m3t_gen.stages.dialogue import DialogueStage
from m3t_gen.stages.embed import EmbedStage
from m3t_gen.stages.filter import FilterStage
from m3t_gen.stages.judge import JudgeStage, TripletJudgeStage
from m3t_gen.stages.modify import ModifyStage
from m3t_gen.stages.reward import RewardStage
from m3t_gen.stages.triplet_filter import TripletFilterStage
from m3t_gen.stages.triplet_reward import TripletRewardStage

SAMPLE_STAGES: list[type[Stage]] = [DedupeStage, CaptionStage, EmbedStage, DialogueStage, RewardStage, JudgeStage,
                                    FilterStage]
CIR_STAGES: list[type[Stage]] = [ModifyStage, TripletRewardStage, TripletJudgeStage, TripletFilterStage]
STAGES: dict[str, type[Stage]] = {s.name: s for s in SAMPLE_STAGES + CIR_STAGES}
SAMPLE_ORDER = ["read"] + [s.name for s in SAMPLE_STAGES]  # the summary table's rows (read is the reader)


def enabled(cfg: PipelineConfig, stages: list[type[Stage]] | None = None) -> list[type[Stage]]:
    return [s for s in (stages if stages is not None else SAMPLE_STAGES + CIR_STAGES) if s.enabled(cfg)]


def lineage(cfg: PipelineConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(template name per generating stage, model per role) of the stages this config runs: what the manifest
    and every sample's lineage record, so a stage that does not run (the captioner of a single-stage run) is
    not named."""
    templates: dict[str, str] = {}
    models: dict[str, str] = {}
    for stage in enabled(cfg):
        section = stage.settings(cfg)
        templates.update(stage.templates(cfg))
        if stage.model_role:
            model = section.model
            models[stage.model_role] = model if isinstance(model, str) else model.model
    return templates, models


logger = logging.getLogger(__name__)


def _run_stateless(batch: Any, stage_cls: type[Stage], ctx: RunContext) -> Any:
    return stage_cls(ctx)(batch)


def _decode_ahead(batch: Any, stage_cls: type[Stage], config: PipelineConfig) -> Any:
    return stage_cls.decode_ahead(batch, config)


class PoolRendezvous:
    """Where the actors of one pass's pools meet before any of them takes work. Ray Data hands a block to any
    actor that is up, so the first engine to load would take every batch while its peers still load; Ray Data's
    own guard (``wait_for_min_actors_s``) blocks the executor in each operator's start, one operator after the
    other, so every pool's engines load in turn. Here all pools start at once (their engines load in parallel)
    and each actor's constructor ends only when its whole pool has arrived: Ray Data sees the K actors of a pool
    become ready together. A restarted actor finds its pool complete and passes at once."""

    def __init__(self) -> None:
        self.arrived: Counter[str] = Counter()
        self.complete: dict[str, asyncio.Event] = {}

    async def arrive(self, pool: str, size: int, timeout_s: float) -> int:
        """Wait until ``size`` actors of ``pool`` arrived (at most ``timeout_s``); the number that had."""
        self.arrived[pool] += 1
        event = self.complete.setdefault(pool, asyncio.Event())
        if self.arrived[pool] >= size:
            event.set()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return self.arrived[pool]


def _trace_start(stage: str, event: str) -> None:
    """With M3T_GEN_START_TRACE=FILE (bench/start_timeline.py), each actor appends when its constructor began,
    when its model was loaded, and when its first batch came: where a run's start-up time goes."""
    path = os.environ.get("M3T_GEN_START_TRACE")
    if path:
        import json
        import time

        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": stage, "pid": os.getpid(), "event": event, "t": time.time()}) + "\n")


def _pooled(stage: type[Stage]) -> type[Stage]:
    """The class Ray Data builds in each actor of ``stage``'s pool: the stage, then the meeting of its pool.
    Same name as the stage, so Ray Data's progress shows the stage."""

    def __init__(self: Stage, ctx: RunContext, pool_size: int) -> None:
        _trace_start(stage.name, "start")
        stage.__init__(self, ctx)
        _trace_start(stage.name, "built")
        import ray

        timeout = ctx.config.ray.wait_for_actors_s
        if pool_size > 1 and timeout > 0:
            up = ray.get(ctx.shared["rendezvous"].arrive.remote(stage.name, pool_size, timeout))
            if up < pool_size:
                logger.warning("%s: %d of %d actors up after %d s (ray.wait_for_actors_s); starting with them",
                               stage.name, up, pool_size, timeout)
        self._first_batch = True

    def __call__(self: Stage, batch: Any) -> Any:
        if self._first_batch:
            self._first_batch = False
            _trace_start(stage.name, "first_batch")
        return stage.__call__(self, batch)

    return type(stage.__name__, (stage,), {"__init__": __init__, "__call__": __call__, "__module__": stage.__module__,
                                           "__qualname__": f"{stage.__qualname__}.pooled"})


def apply_stages(ds: Any, stages: list[type[Stage]], cfg: PipelineConfig, ctx: RunContext) -> Any:
    """Each enabled stage becomes one map_batches: an actor pool (models) or stateless tasks."""
    import ray
    from ray.data import ActorPoolStrategy

    if any(s.uses_actor() and s.resources(cfg).concurrency > 1 for s in enabled(cfg, stages)):
        rendezvous = ray.remote(num_cpus=0)(PoolRendezvous).remote()
        ctx = dataclasses.replace(ctx, shared={**ctx.shared, "rendezvous": rendezvous})
    for stage in enabled(cfg, stages):
        res = stage.resources(cfg)
        common = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus)
        if stage.decodes_ahead(cfg):
            # The images decoded in tasks of their own, beside the engine (which then only wraps the pixels):
            # decoding in the actor held the engine up (issue 27).
            ds = ds.map_batches(_decode_ahead, fn_kwargs={"stage_cls": stage, "config": cfg},
                                batch_size=res.batch_size, batch_format="pyarrow",
                                num_cpus=stage.settings(cfg).resources.decode_cpus)
        if stage.uses_actor():
            # Restart actors lost with a node and retry their batches (Ray Data's default today; pinned here).
            # batches_in_flight > 1: that many __call__s run at once in the actor's threads (the stage and its
            # backend are thread-safe), so an engine never waits for the next batch to arrive.
            # One block queued behind the ones running: the actor never waits for its next batch, and a slower actor
            # is not left holding Ray Data's default of 4 queued blocks when the others run dry (the pass's tail).
            pool = ActorPoolStrategy(size=res.concurrency, max_concurrent_calls_per_actor=res.batches_in_flight,
                                     max_tasks_in_flight_per_actor=res.batches_in_flight + 1,
                                     enable_true_multi_threading=res.batches_in_flight > 1)
            ds = ds.map_batches(_pooled(stage), fn_constructor_kwargs={"ctx": ctx, "pool_size": res.concurrency},
                                compute=pool,
                                num_gpus=res.num_gpus or None, max_restarts=-1, max_task_retries=-1, **common)
        else:
            ds = ds.map_batches(_run_stateless, fn_kwargs={"stage_cls": stage, "ctx": ctx}, **common)
    return ds


def init_ray(cfg: PipelineConfig) -> None:
    """Start or join Ray, then apply the config's data-context settings, also when Ray was already up (a second
    pass of the same run, a caller's own ray.init): preserve_order decides which duplicate survives."""
    import ray
    import ray.data

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True,
                                  "log_to_driver": True, "configure_logging": True}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = cfg.ray.progress
    data_ctx.execution_options.preserve_order = cfg.ray.preserve_order
    # Pools start together and meet in PoolRendezvous; Ray Data's own wait would start them one after another.
    data_ctx.wait_for_min_actors_s = -1


def stage_table(stats: list[Any], names: list[str], rows_in: int,
                always: frozenset[str] | None = None) -> list[StageRow]:
    """The per-stage table of a pass (the manifest's ``stages``, ``cir.stages``), the one place it is built: rows in,
    kept, rejected, actor seconds and generated tokens per stage in order, summed over the shards' or parts' stats
    (``ShardStats`` or ``TripletStats``). A stage with no time and no rejection did not run in this recipe and is
    left out, unless listed in ``always``."""
    from m3t_gen.rows import usage_fields

    rejected: Counter = Counter()
    seconds: Counter = Counter()
    tokens: Counter = Counter()
    for s in stats:
        for key, n in s.reasons.items():
            rejected[key.split(":", 1)[0]] += n
        seconds.update(s.stage_seconds)
        tokens.update(s.stage_tokens)
    table = []
    for name in names:
        if (always is None or name not in always) and name not in seconds and not rejected[name]:
            continue
        kept = rows_in - rejected[name]
        table.append(StageRow(stage=name, rows_in=rows_in, kept=kept, rejected=rejected[name],
                              busy_seconds=round(seconds.get(name, 0.0), 2), **usage_fields(tokens, name)))
        rows_in = kept
    return table
