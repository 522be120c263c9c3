"""`m3t-gen plan`: a dry run (no model, no Ray) estimating tokens and GPU-hours per stage."""

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from m3t_gen.cli import main
from m3t_gen.config import load_config

ROOT = Path(__file__).resolve().parents[1]
M3T = str(ROOT / "pipelines" / "m3t.yaml")
CIR = str(ROOT / "pipelines" / "cir.yaml")
SMOKE = str(ROOT / "pipelines" / "smoke.yaml")
GPU_STAGES = ("caption", "dialogue", "reward")


def plan(*args: str) -> dict:
    result = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.strip().splitlines()
    data = json.loads(lines[-1])
    data["_text"] = "\n".join(lines[:-1])
    return data


def by_stage(data: dict) -> dict:
    return {s["stage"]: s for s in data["stages"]}


def test_m3t_5m_images_gives_finite_positive_gpu_hours_per_gpu_stage():
    data = plan(M3T, "--images", "5000000")
    stages = by_stage(data)
    for name in GPU_STAGES:
        s = stages[name]
        assert s["device"] == "gpu"
        assert math.isfinite(s["gpu_hours"]) and s["gpu_hours"] > 0, s
        assert s["images"] == 5_000_000
        assert s["prompt_tokens_per_image"] > 0
    for name in ("caption", "dialogue"):
        assert stages[name]["output_tokens_per_image"] > 0
        assert stages[name]["output_tokens"] == pytest.approx(5_000_000 * stages[name]["output_tokens_per_image"])
    # Caption: the rendered template plus the vision tokens of a 1344x1008 image in 28-px tokens (48 x 36).
    assert stages["caption"]["prompt_tokens_per_image"] > 48 * 36
    # Output bound: the caption's max_tokens; the dialogue's schema bound is under its max_tokens.
    cfg = load_config(M3T)
    assert stages["caption"]["output_tokens_per_image"] == cfg.caption.sampling.max_tokens
    assert 0 < stages["dialogue"]["output_tokens_per_image"] <= cfg.dialogue.sampling.max_tokens
    assert data["total_gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in data["stages"]))
    # Wall clock: GPU-hours over the configured GPUs (num_gpus x concurrency); the slowest stage sets it.
    for name in GPU_STAGES:
        res = getattr(cfg, name).resources
        assert stages[name]["wall_hours"] == pytest.approx(stages[name]["gpu_hours"] / (res.num_gpus * res.concurrency))
    model_stages = [s for s in data["stages"] if s["stage"] != "read"]
    assert data["wall_hours"] == pytest.approx(max(s["wall_hours"] for s in model_stages))
    assert data["total_gpus"] == sum(s["gpus_per_replica"] * s["replicas"] for s in model_stages)
    assert stages["read"]["device"] == "cpu" and stages["read"]["device_hours"] > 0
    assert "GPU-hours" in data["_text"] and "caption" in data["_text"]


def test_default_throughputs_carry_their_sources_and_the_documented_total():
    """Every default rate names the published figure it follows, and the plan prints it; the figures quoted in
    docs/cluster.md are what the plan says (issue 26: a 7B captioner is planned from vLLM's figure for
    Qwen2.5-VL-7B, no longer at a quarter of it)."""
    from m3t_gen.tools.plan import CLIP_IMAGES_PER_S, CLIP_SOURCES, GEN_TOKENS_PER_S

    assert all(row.source for row in GEN_TOKENS_PER_S) and set(CLIP_SOURCES) == set(CLIP_IMAGES_PER_S)
    rates = [row.tok_s for row in GEN_TOKENS_PER_S]
    assert rates == sorted(rates, reverse=True)  # a larger class is never planned faster
    data = plan(M3T, "--images", "5000000")
    stages = by_stage(data)
    assert stages["caption"]["throughput"] == pytest.approx(4000)  # 7B VLM: 0.52 of the 7,747 published
    assert "sgl-project/sglang#9812" in stages["caption"]["throughput_source"]
    assert "MLPerf" in stages["dialogue"]["throughput_source"]
    assert "RTX 4090" in stages["reward"]["throughput_source"]
    assert "sgl-project/sglang#9812" in data["_text"] and "MLPerf" in data["_text"]
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"says {data['total_gpu_hours']:,.0f} GPU-hours" in docs
    assert f"dialogue {stages['dialogue']['gpu_hours']:,.0f} of {data['total_gpu_hours']:,.0f} GPU-hours" in docs


def test_estimate_scales_linearly_with_images():
    small, big = (by_stage(plan(M3T, "--images", n)) for n in ("1000000", "5000000"))
    for name in GPU_STAGES:
        assert big[name]["gpu_hours"] == pytest.approx(5 * small[name]["gpu_hours"])
        assert big[name]["prompt_tokens"] == pytest.approx(5 * small[name]["prompt_tokens"])
    assert big["read"]["device_hours"] == pytest.approx(5 * small["read"]["device_hours"])


def test_throughput_override_changes_the_estimate_inversely():
    base = by_stage(plan(M3T, "--images", "5000000"))
    fast = by_stage(plan(M3T, "--images", "5000000", "--throughput", f"caption={base['caption']['throughput'] * 4}",
                         "--throughput", "reward=250"))
    assert fast["caption"]["gpu_hours"] == pytest.approx(base["caption"]["gpu_hours"] / 4)
    assert fast["caption"]["throughput_source"] == "--throughput"
    assert fast["reward"]["gpu_hours"] == pytest.approx(5_000_000 / 250 / 3600)
    assert fast["dialogue"]["gpu_hours"] == pytest.approx(base["dialogue"]["gpu_hours"])


def test_vllm_tensor_parallel_counts_its_gpus():
    base = by_stage(plan(M3T, "--images", "1000"))
    tp = plan(M3T, "--images", "1000", "--set", "dialogue.model.options.tensor_parallel_size=4")
    stages = by_stage(tp)
    assert stages["dialogue"]["gpus_per_replica"] == 4
    assert stages["dialogue"]["wall_hours"] == pytest.approx(base["dialogue"]["gpu_hours"] / (4 * 2))
    assert "tensor x pipeline parallel = 4" in tp["_text"]


def test_cir_recipe_plans_the_pair_pass_after_the_sample_pass():
    data = plan(str(ROOT / "pipelines" / "cir.yaml"), "--images", "1000000")
    stages = by_stage(data)
    assert "dialogue" not in stages and {"caption", "modify", "triplet_reward"} <= set(stages)
    cfg = load_config(ROOT / "pipelines" / "cir.yaml")
    assert stages["modify"]["images"] == 1_000_000 * cfg.cir.pairing.pairs_per_image  # pairs
    assert stages["modify"]["gpu_hours"] > 0
    first = max(stages[n]["wall_hours"] for n in ("caption", "embed"))
    second = max(stages[n]["wall_hours"] for n in ("modify", "triplet_reward"))
    # Exact pair mining between the passes: 2 N^2 d FLOP over the pass's GPUs, in the wall-clock total.
    mining = stages["pair_mining"]
    assert mining["device"] == "gpu" and mining["notes"] == [f"2 N^2 d FLOP = {2 * 1e6 ** 2 * 768:.3g}"]
    assert mining["wall_hours"] == pytest.approx(2 * 1e6 ** 2 * 768 / (mining["throughput"] * 1e9) / 3600 / 4)
    assert data["wall_hours"] == pytest.approx(first + mining["wall_hours"] + second)
    assert [s["stage"] for s in data["stages"]].index("pair_mining") == \
        [s["stage"] for s in data["stages"]].index("modify") - 1
    faster = by_stage(plan(str(ROOT / "pipelines" / "cir.yaml"), "--images", "1000000", "--throughput",
                           f"pair_mining={mining['throughput'] * 2}"))
    assert faster["pair_mining"]["wall_hours"] == pytest.approx(mining["wall_hours"] / 2)


def test_from_run_uses_measured_throughput_and_pass_rates(tmp_path):
    cfg = load_config(M3T)
    manifest = {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "totals": {"read": 1000, "kept": 700, "rejected": 300},
        "stages": [
            {"stage": "read", "in": 1000, "kept": 900, "rejected": 100, "busy_seconds": 10.0},
            {"stage": "dedupe", "in": 900, "kept": 800, "rejected": 100, "busy_seconds": 0.1},
            {"stage": "caption", "in": 800, "kept": 800, "rejected": 0, "busy_seconds": 400.0,
             "output_tokens": 800 * 200},
            {"stage": "dialogue", "in": 800, "kept": 780, "rejected": 20, "busy_seconds": 100.0,
             "output_tokens": 800 * 450},
            {"stage": "reward", "in": 780, "kept": 780, "rejected": 0, "busy_seconds": 1.0},
            {"stage": "filter", "in": 780, "kept": 700, "rejected": 80, "busy_seconds": 0.1},
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stages = by_stage(plan(M3T, "--images", "5000000", "--from-run", str(tmp_path)))
    # caption: 800 images in 400 replica-seconds on 1 GPU each = 2 images/s/GPU; 80 % of the images reach it.
    assert stages["caption"]["images"] == pytest.approx(4_000_000)
    assert stages["caption"]["images_per_second_per_device"] == pytest.approx(2.0)
    assert stages["caption"]["gpu_hours"] == pytest.approx(4_000_000 / 2.0 / 3600)
    assert stages["caption"]["throughput_source"].startswith("measured")
    # The run counted its generated tokens: 200 per image at 2 images/s = 400 tok/s per GPU.
    assert stages["caption"]["output_tokens_per_image"] == pytest.approx(200)
    assert stages["caption"]["throughput"] == pytest.approx(400)
    assert stages["dialogue"]["output_tokens_per_image"] == pytest.approx(450)
    # Another max_tokens than the run's: the measured rate stays, the tokens per image fall back to the bound.
    other = by_stage(plan(M3T, "--images", "5000000", "--from-run", str(tmp_path),
                          "--set", "dialogue.sampling.max_tokens=1500"))
    assert other["dialogue"]["output_tokens_per_image"] == 1500  # reasoning budget + answer, within max_tokens
    assert other["dialogue"]["gpu_hours"] == pytest.approx(stages["dialogue"]["gpu_hours"])
    assert stages["reward"]["gpu_hours"] == pytest.approx(5_000_000 * 0.78 / 780 / 3600)
    assert stages["read"]["throughput"] == pytest.approx(0.01)  # s/image/core
    # Without a measured CIR pass the modify stage plans from defaults.
    cir_plan = by_stage(plan(CIR, "--images", "5000000", "--from-run", str(tmp_path)))
    assert cir_plan["modify"]["throughput_source"].startswith("default")
    # An explicit --throughput still wins over the measurement.
    over = by_stage(plan(M3T, "--images", "5000000", "--from-run", str(tmp_path), "--throughput", "reward=100"))
    assert over["reward"]["gpu_hours"] == pytest.approx(5_000_000 * 0.78 / 100 / 3600)


def test_tiny_models_are_counted_with_their_tokenizer_when_built():
    from m3t_gen.models import tiny_cache_dir
    from m3t_gen.testing.tiny_models import ensure_tiny_model

    ensure_tiny_model("qwen2_5_vl", tiny_cache_dir())
    ensure_tiny_model("lm", tiny_cache_dir())
    data = plan(SMOKE, "--images", "19")
    assert "tokenizer of tiny:qwen2_5_vl" in data["_text"] and "tokenizer of tiny:lm" in data["_text"]
    stages = by_stage(data)
    # The smoke config runs on CPU actors: no GPU-hours, but actor-hours and a wall estimate.
    assert all(stages[n]["device"] == "cpu" and stages[n]["gpu_hours"] == 0 for n in GPU_STAGES)
    assert all(stages[n]["device_hours"] > 0 for n in GPU_STAGES)


@pytest.mark.parametrize("args, needle", [
    (["--set", "caption.sampling.temperature=-1"], "caption.sampling.temperature"),
    (["--set", "dialogue.nonsense=1"], "dialogue.nonsense: unknown key"),
    (["--throughput", "caption=fast"], "--throughput"),
    (["--throughput", "decode=10"], "--throughput"),
    (["--throughput", "modify=10"], "no modify stage"),
    (["--throughput", "caption=-5"], "positive"),
    (["--from-run", "/nonexistent/run"], "--from-run"),
])
def test_bad_input_exits_2_with_one_line_error(args, needle):
    result = CliRunner().invoke(main, ["plan", M3T, "--images", "100", *args])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], result.stderr


def test_bad_config_file_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ninput: {paths: [a.tar]}\ncaption: {model: {backend: nope, model: tiny:vlm}}\n")
    result = CliRunner().invoke(main, ["plan", str(bad), "--images", "10"])
    assert result.exit_code == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]


def test_from_run_measures_the_cir_pass_in_pairs(tmp_path):
    cfg = load_config(CIR)
    manifest = {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "totals": {"read": 1000, "kept": 1000, "rejected": 0},
        "stages": [{"stage": "read", "in": 1000, "kept": 1000, "rejected": 0, "busy_seconds": 10.0},
                   {"stage": "caption", "in": 1000, "kept": 1000, "rejected": 0, "busy_seconds": 500.0,
                    "output_tokens": 1000 * 150}],
        "cir": {"pool": 1000, "pairs": 1000, "kept": 900, "rejected": 100, "reasons": {},
                "stages": [{"stage": "modify", "in": 1000, "kept": 950, "rejected": 50, "busy_seconds": 250.0,
                            "output_tokens": 1000 * 120},
                           {"stage": "triplet_reward", "in": 950, "kept": 950, "rejected": 0, "busy_seconds": 2.0},
                           {"stage": "triplet_filter", "in": 950, "kept": 900, "rejected": 50,
                            "busy_seconds": 0.1}]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stages = by_stage(plan(CIR, "--images", "1000000", "--from-run", str(tmp_path)))
    gpus = cfg.cir.modify.resources.num_gpus or 1
    # 1000 pairs in 250 replica-seconds: 4 pairs/s per replica; 120 tokens per pair measured.
    assert stages["modify"]["throughput_source"].startswith("measured")
    assert stages["modify"]["output_tokens_per_image"] == pytest.approx(120)
    assert stages["modify"]["throughput"] == pytest.approx(4 / gpus * 120)
    assert stages["triplet_reward"]["throughput_source"].startswith("measured")
    # Pairs per image still come from the config (every pooled image paired), not from the run's pair count.
    assert stages["modify"]["images"] == pytest.approx(1_000_000 * cfg.cir.pairing.pairs_per_image)


def test_reasoning_budget_is_planned_as_output():
    """A reasoning writer's budget is output the GPUs generate: planned on top of the answer's bound, within
    max_tokens; without reasoning the bound is the answer's alone."""
    with_budget = by_stage(plan(M3T, "--images", "1000"))["dialogue"]["output_tokens_per_image"]
    plain = by_stage(plan(M3T, "--images", "1000", "--set", "dialogue.model.reasoning=null"))["dialogue"]
    assert with_budget == pytest.approx(min(plain["output_tokens_per_image"] + 1024, 3072))
    assert with_budget > plain["output_tokens_per_image"]


def test_every_model_stage_owns_its_estimate():
    """plan has no per-stage branch: each stage with a model answers Stage.estimate itself (a new stage without
    one fails here), for every recipe and variant the bundled pipelines cover."""
    from m3t_gen.config import load_config
    from m3t_gen.run.recipe import STAGES, enabled
    from m3t_gen.stages.estimate import Estimating

    variants = [(M3T, []), (CIR, []), (SMOKE, []), (M3T, ["dialogue.source=image"]),
                (SMOKE, ["judge.answerability=false"]), (CIR, ["cir.modify.source=images"])]
    seen = set()
    for path, overrides in variants:
        cfg = load_config(path, overrides)
        est = Estimating(cfg, 1024, 28, 1.0, {})
        for stage in (s for s in enabled(cfg) if s.model_role):
            work = stage.estimate(est)
            assert work is not None and work.items_per_image > 0, stage.name
            assert work.output > 0 if work.generates else work.output == 0, stage.name
            est.work[stage.name] = work
            seen.add(stage.name)
    assert seen == {s.name for s in STAGES.values() if s.model_role}


def test_single_stage_plan_counts_the_image_not_a_caption():
    single = by_stage(plan(M3T, "--images", "1000", "--set", "dialogue.source=image"))
    two = by_stage(plan(M3T, "--images", "1000"))
    assert "caption" not in single and single["dialogue"]["prompt_tokens_per_image"] > 1000  # vision tokens in
    assert single["dialogue"]["output_tokens_per_image"] > two["dialogue"]["output_tokens_per_image"]  # it writes the description
