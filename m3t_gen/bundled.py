"""Where bundled prompts, schemas, recipes and sample data are found.

In a source checkout they live at the repository's top level (where people edit them); a built wheel
carries them under ``m3t_gen/_data`` (see pyproject's force-include). Both layouts resolve here.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """``kind`` is one of prompts, schemas, pipelines, data."""
    for candidate in (_PKG / "_data" / kind, _PKG.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled {kind}/ not found next to {_PKG}")


def find_file(name: str, kind: str, base_dir: str | Path | None = None) -> Path:
    """Resolve a user-given file name: as a path (relative to the pipeline file), then in the bundled folder."""
    direct = Path(name).expanduser()
    if not direct.is_absolute() and base_dir is not None:
        direct = Path(base_dir) / direct
    if direct.is_file():
        return direct
    bundled = data_dir(kind) / name
    if bundled.is_file():
        return bundled
    raise FileNotFoundError(f"{name!r} is neither a file nor a bundled {kind[:-1]} in {data_dir(kind)}")
