"""Bad configs give one line naming the YAML path and what was expected, exit code 2, no traceback."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from m3t_gen.cli import main
from m3t_gen.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "pipelines" / "smoke.yaml").read_text())


def _write(tmp_path: Path, data) -> Path:
    # Keep the relative input path of the smoke recipe valid from tmp_path.
    path = tmp_path / "pipeline.yaml"
    if isinstance(data, dict) and "input" in data:
        data["input"]["paths"] = [str(ROOT / "data" / "smoke" / "*.tar")]
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _mutate(path: str, value, delete: bool = False) -> dict:
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if delete:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


BAD = [
    # (name, config data, expected fragment of the one-line error)
    ("unknown top-level key", _mutate("captoin", {}), "captoin: unknown key"),
    ("unknown nested key", _mutate("caption.sampling.temprature", 0.5), "caption.sampling.temprature: unknown key"),
    ("wrong type", _mutate("caption.sampling.temperature", "hot"), "caption.sampling.temperature: Input should be a valid number"),
    ("out of range", _mutate("caption.sampling.temperature", -1), "caption.sampling.temperature: Input should be greater than or equal to 0"),
    ("missing section", _mutate("input", None, delete=True), "input: required key is missing"),
    ("unknown backend", _mutate("caption.model.backend", "tgi"), "caption.model: unknown backend 'tgi'"),
    ("malformed model reference", _mutate("caption.model.model", "not a model!"), "caption.model.model: 'not a model!' is neither"),
    ("unknown tiny model", _mutate("reward.model", "tiny:giant"), "reward.model: unknown tiny model 'giant'"),
    ("unknown backend option", _mutate("dialogue.model.options.gpu_mem", 0.3), "dialogue.model: options.gpu_mem: unknown key"),
    # Checked against the installed vLLM's EngineArgs at validate time, not by a dead actor minutes later.
    ("unknown vLLM engine argument", _mutate("dialogue.model.options.engine_args.kv_cache_mem", 1),
     "dialogue.model: options.engine_args: unknown vLLM engine argument(s): kv_cache_mem (backend 'vllm')"),
    ("reasoning without a parser", _mutate("dialogue.model.reasoning", {"budget": 8}), "dialogue.model.reasoning.parser: required key is missing"),
    ("reasoning on transformers", _mutate("caption.model", {"backend": "transformers", "model": "tiny:qwen3", "reasoning": {"parser": "qwen3"}}),
     "caption.model: reasoning: not supported by backend 'transformers'"),
    ("reasoning budget above max_tokens", _mutate("dialogue.model.reasoning", {"parser": "qwen3", "budget": 4096}),
     "dialogue: model.reasoning.budget (4096) must be below sampling.max_tokens (1024)"),
    ("negative turn count", _mutate("dialogue.mix.vqa_creative", -1), "dialogue.mix: turn counts must be >= 0"),
    ("unknown turn type", _mutate("dialogue.mix.chitchat", 1), "dialogue.mix.chitchat"),
    ("zero batch size", _mutate("reward.resources.batch_size", 0), "reward.resources.batch_size: Input should be greater than or equal to 1"),
    ("threshold out of range", _mutate("filter.min_turn_score", 2), "filter.min_turn_score: Input should be less than or equal to 1"),
    ("bad run name", _mutate("name", "my run"), "name: String should match pattern"),
    ("invalid yaml", "name: smoke\ncaption: [unclosed\n", "invalid YAML at line"),
    ("top level not a mapping", "- a\n- b\n", "(top level): expected a mapping"),
    ("m3t recipe without dialogue", _mutate("dialogue", None, delete=True), "recipe m3t needs a dialogue: section"),
    ("cir recipe without cir section", _mutate("cir", None, delete=True), "recipe cir needs a cir: section"),
    ("inverted similarity band", _mutate("cir.pairing.min_similarity", 1.0), "cir.pairing: min_similarity must be <= max_similarity"),
    ("unknown recipe", _mutate("recipe", "vqa"), "recipe: Input should be 'm3t', 'cir' or 'm3t+cir'"),
    ("missing template", _mutate("caption.template", "nope.j2"), "caption.template: 'nope.j2' is neither a file nor a bundled prompt"),
]


@pytest.mark.parametrize("name,data,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_config_one_line_exit_2(tmp_path, name, data, fragment):
    path = _write(tmp_path, data)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert fragment in err, err


def test_template_using_a_field_the_stage_does_not_have(tmp_path):
    (tmp_path / "bad.j2").write_text("Describe {{ sample.colour }} please")
    data = _mutate("caption.template", "bad.j2")
    path = _write(tmp_path, data)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "caption.template" in result.stderr and "colour" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_set_override(tmp_path):
    path = _write(tmp_path, _mutate("seed", 0))
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "seed.x=1"])
    assert result.exit_code == 2
    assert "--set 'seed.x=1': seed is not a mapping" in result.stderr


def test_run_with_input_matching_nothing(tmp_path):
    path = _write(tmp_path, _mutate("seed", 0))
    result = CliRunner().invoke(main, ["run", str(path), "--input", str(tmp_path / "none-*.tar"),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "input.paths" in result.stderr and "matches no file" in result.stderr


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    path = _write(tmp_path, _mutate("seed", 0))
    cfg = load_config(path, ["caption.sampling.temperature=0.25", "limit=3", "filter.min_turn_score=null"])
    assert cfg.caption.sampling.temperature == 0.25
    assert cfg.limit == 3
    assert cfg.filter.min_turn_score is None


def test_recipes_validate_without_loading_models():
    for name in ("smoke.yaml", "m3t.yaml", "cir.yaml"):
        result = CliRunner().invoke(main, ["validate", str(ROOT / "pipelines" / name)])
        assert result.exit_code == 0, result.output
        assert "is valid" in result.output


def test_error_is_a_config_error_not_a_crash(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")


def test_config_hash_leaves_out_exactly_the_fields_marked_placement(tmp_path):
    """Placement (where and with how much a run happens) is marked on the config models; the hash and the resume
    comparison read the marks. ray.preserve_order decides which duplicate survives: it is in the hash."""
    from m3t_gen.config import PLACEMENT, PipelineConfig, placement_exclude
    from m3t_gen.run.pipeline import config_changes, result_hash

    path = _write(tmp_path, _mutate("seed", 0))
    base = load_config(path)
    same = ["caption.resources.concurrency=7", "reward.resources.batch_size=3", "read.num_cpus=0.5",
            "ray.num_cpus=64", "ray.address=ray://head:10001", "ray.progress=false", "output.dir=/elsewhere",
            "cir.modify.resources.num_gpus=1", "dialogue.resources.batches_in_flight=2", "file_roots=[/srv]"]
    for change in same:
        assert result_hash(load_config(path, [change])) == result_hash(base), change
    for change in ("seed=1", "ray.preserve_order=false", "output.samples_per_tar=5", "read.max_aspect_ratio=3"):
        other = load_config(path, [change])
        assert result_hash(other) != result_hash(base), change
        assert config_changes(base.model_dump(mode="json", by_alias=True),
                              other.model_dump(mode="json", by_alias=True)) == [
            f"{change.split('=')[0]}: {_value(base, change)!r} -> {_value(other, change)!r}"]
    assert placement_exclude(PipelineConfig)["ray"] == {"address": True, "num_cpus": True, "progress": True,
                                                        "wait_for_actors_s": True}
    assert PLACEMENT == {"placement": True}


def _value(cfg, change):
    node = cfg.model_dump(mode="json", by_alias=True)
    for part in change.split("=")[0].split("."):
        node = node[part]
    return node


def test_one_dtype_spelling_for_every_engine(tmp_path):
    path = _write(tmp_path, _mutate("seed", 0))
    cfg = load_config(path, ["caption.model.dtype=bf16", "reward.dtype=FP16", "dialogue.model.dtype=float"])
    assert (cfg.caption.model.dtype, cfg.reward.dtype, cfg.dialogue.model.dtype) == ("bfloat16", "float16", "float32")
    with pytest.raises(ConfigError, match="caption.model.dtype: unknown dtype 'int3'"):
        load_config(path, ["caption.model.dtype=int3"])
    from m3t_gen.models import torch_dtype

    import torch

    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("auto", "cuda") is torch.float16
