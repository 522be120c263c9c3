"""Batches in flight: the code around the engines that lets one actor work on several batches at once.
(The real vLLM engine under concurrent callers is tested in test_vllm_backend.py; here a scripted engine
drives the feeder's failure paths, which a real engine cannot be made to hit on demand.)"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from m3t_gen.backends.vllm_backend import EngineDead, EngineFeeder
from m3t_gen.stages.base import SharedClock


class ScriptedLLM:
    """enqueue_chat / llm_engine.step with vLLM's shapes: each request finishes after `steps` engine steps;
    a conversation whose text is "bad" is refused when added; `fail_at_step` makes step() raise."""

    def __init__(self, steps: int = 3, fail_at_step: int | None = None) -> None:
        self.steps, self.fail_at_step = steps, fail_at_step
        self.live: dict[str, int] = {}
        self.count = 0
        self.n_steps = 0
        self.llm_engine = SimpleNamespace(step=self._step)

    def enqueue_chat(self, conversations, params, use_tqdm=False, chat_template_kwargs=None):
        self.template_kwargs = chat_template_kwargs
        if any(c[0]["content"] == "bad" for c in conversations):
            raise ValueError("prompt too long")  # vLLM aborts what it had added of this call
        if any(c[0]["content"] == "dead" for c in conversations):
            raise RuntimeError("EngineDeadError: EngineCore encountered an issue")  # what a killed core gives
        ids = []
        for conv in conversations:
            self.count += 1
            rid = f"{self.count}-abcd1234"
            self.live[rid] = self.steps
            ids.append(rid)
        return ids

    def _step(self):
        self.n_steps += 1
        if self.fail_at_step is not None and self.n_steps >= self.fail_at_step:
            raise RuntimeError("EngineDeadError: engine core died")
        time.sleep(0.002)
        out = []
        for rid in list(self.live):
            self.live[rid] -= 1
            if self.live[rid] == 0:
                del self.live[rid]
                out.append(SimpleNamespace(request_id=rid.split("-")[0], finished=True))
            else:
                out.append(SimpleNamespace(request_id=rid.split("-")[0], finished=False))
        return out


def conv(text: str = "hi"):
    return [{"role": "user", "content": text}]


def test_feeder_answers_each_caller_in_order_and_overlaps_jobs():
    llm = ScriptedLLM(steps=20)
    feeder = EngineFeeder(lambda: llm)
    try:
        results = {}

        def call(name, n):
            results[name] = feeder.run([conv(f"{name}{i}") for i in range(n)], [None] * n)

        threads = [threading.Thread(target=call, args=(name, n)) for name, n in (("a", 3), ("b", 5), ("c", 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert {k: len(v) for k, v in results.items()} == {"a": 3, "b": 5, "c": 1}
        for outs in results.values():  # a job's outputs keep its request order
            ids = [int(o.request_id) for o in outs]
            assert ids == sorted(ids) and all(o.finished for o in outs)
        assert feeder.stats["jobs"] == 3 and feeder.stats["peak_jobs"] >= 2
        assert feeder.run([], []) == []
    finally:
        feeder.stop()


def test_feeder_refused_request_fails_alone():
    """One refused request comes back as its own error; the rest of its batch generates (added once, not redone
    one by one after the fact); the engine goes on."""
    llm = ScriptedLLM()
    feeder = EngineFeeder(lambda: llm)
    try:
        outs = feeder.run([conv("ok"), conv("bad"), conv("ok2")], [None] * 3,
                          {"chat_template_kwargs": {"enable_thinking": False}})
        assert isinstance(outs[1], ValueError) and "prompt too long" in str(outs[1])
        assert outs[0].finished and outs[2].finished
        assert llm.count == 2  # the two good requests entered the engine once each
        assert llm.template_kwargs == {"enable_thinking": False}  # chat kwargs reach vLLM
        assert len(feeder.run([conv("ok")], [None])) == 1
    finally:
        feeder.stop()


def test_feeder_engine_failure_fails_every_caller_now_and_later():
    feeder = EngineFeeder(lambda: ScriptedLLM(steps=50, fail_at_step=10))
    errors = []

    def call():
        try:
            feeder.run([conv()], [None])
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(errors) == 3 and all(isinstance(e, EngineDead) and "engine core died" in str(e) for e in errors)
    assert isinstance(feeder.failed, EngineDead)
    with pytest.raises(EngineDead, match="failed earlier"):
        feeder.run([conv()], [None])
    feeder.stop()


def test_feeder_engine_dead_while_adding_fails_that_caller_too():
    """Regression: a job whose adding hit a dead engine was in no table and waited forever."""
    feeder = EngineFeeder(lambda: ScriptedLLM())
    box = {}

    def call():
        try:
            feeder.run([conv("dead")], [None])
        except Exception as err:  # noqa: BLE001
            box["err"] = err

    t = threading.Thread(target=call)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and isinstance(box["err"], EngineDead) and "EngineCore" in str(box["err"])
    feeder.stop()


def test_feeder_stop_releases_waiting_callers():
    feeder = EngineFeeder(lambda: ScriptedLLM(steps=10**9))  # never finishes
    box = {}

    def call():
        try:
            feeder.run([conv()], [None])
        except Exception as err:  # noqa: BLE001
            box["err"] = err

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    feeder.stop()
    t.join(timeout=10)
    assert not t.is_alive() and "closed" in str(box["err"])


def test_shared_clock_splits_overlap():
    """Two calls overlapping fully for 0.2 s are charged 0.1 s each; alone, a call is charged its wall time."""
    clock = SharedClock()
    charged = {}
    barrier = threading.Barrier(2)

    def call(name):
        barrier.wait()
        token = clock.start()
        time.sleep(0.2)
        charged[name] = clock.stop(token)

    threads = [threading.Thread(target=call, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(charged.values()) == pytest.approx(0.2, abs=0.05)
    assert charged["a"] == pytest.approx(charged["b"], abs=0.03)
    token = clock.start()
    time.sleep(0.1)
    assert clock.stop(token) == pytest.approx(0.1, abs=0.03)


def test_batches_in_flight_default_comes_from_the_backend():
    from m3t_gen.config import load_config
    from m3t_gen.stages.caption import CaptionStage
    from m3t_gen.stages.dialogue import DialogueStage
    from m3t_gen.stages.reward import RewardStage

    cfg = load_config("pipelines/smoke.yaml")
    assert cfg.dialogue.model.backend == "vllm" and cfg.caption.model.backend == "vllm"
    assert DialogueStage.resources(cfg).batches_in_flight == 1  # measured: 2 does not pay on a CPU box
    assert CaptionStage.resources(cfg).batches_in_flight == 1
    tf = load_config("pipelines/smoke.yaml", ["caption.model={backend: transformers, model: 'tiny:qwen2_5_vl'}"])
    assert CaptionStage.resources(tf).batches_in_flight == 1  # eager torch: one batch at a time
    assert RewardStage.resources(cfg).batches_in_flight == 1
    openai = load_config("pipelines/smoke.yaml", ["dialogue.model.backend=openai",
                                                  "dialogue.model.options={base_url: 'http://127.0.0.1:9/v1'}"])
    assert DialogueStage.resources(openai).batches_in_flight == 2  # a remote server: keep it fed
    # An explicit setting wins, and the rest of the block is kept.
    cfg = load_config("pipelines/smoke.yaml", ["dialogue.resources.batches_in_flight=2",
                                              "caption.resources.batches_in_flight=3"])
    assert DialogueStage.resources(cfg).batches_in_flight == 2
    res = CaptionStage.resources(cfg)
    assert res.batches_in_flight == 3 and res.batch_size == cfg.caption.resources.batch_size


def test_feeder_bug_in_its_own_loop_fails_callers_instead_of_hanging():
    """Any exception in the feeder thread (here: an output whose id it never handed out) reaches the callers."""
    llm = ScriptedLLM(steps=1)
    llm.llm_engine = SimpleNamespace(step=lambda: [SimpleNamespace(request_id="999", finished=True)])
    feeder = EngineFeeder(lambda: llm)
    with pytest.raises(EngineDead, match="KeyError") as info:
        feeder.run([conv()], [None])
    assert isinstance(info.value.__cause__, KeyError)
    feeder.stop()


def test_feeder_builds_and_steps_its_engine_in_its_own_thread():
    """The engine is made in the thread that steps it (torch's OpenMP pool is per thread: issue 27); a build
    that fails raises in the constructor, with the build's own error."""
    made_in, stepped_in = [], []

    def build():
        made_in.append(threading.current_thread())
        llm = ScriptedLLM(steps=2)
        step = llm.llm_engine.step
        llm.llm_engine.step = lambda: (stepped_in.append(threading.current_thread()), step())[1]
        return llm

    feeder = EngineFeeder(build)
    try:
        assert len(feeder.run([conv()], [None])) == 1
        assert made_in[0] is not threading.current_thread()
        assert set(stepped_in) == {made_in[0]}
    finally:
        feeder.stop()

    def broken():
        raise OSError("no such model directory")

    with pytest.raises(OSError, match="no such model"):
        EngineFeeder(broken)
