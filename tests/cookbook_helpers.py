"""What the cookbook tests share: how they run an example as a user would."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def example_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    """The environment of an example's subprocess: the local key, the HF hub offline in a
    fresh cache under ``tmp_path`` (the tokenizer must be found there), this checkout's
    ``jaxreg`` first on the path, and ``extra``."""
    return dict(
        os.environ,
        TINKER_API_KEY="tml-local",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "hub"),
        PYTHONPATH=str(ROOT),
        **extra,
    )
