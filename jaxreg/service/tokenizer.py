"""The base model's tokenizer in HuggingFace's own format, where HuggingFace tools look.

The service's base model reads the 32-symbol vocabulary of ``jaxreg.service.tasks``.
This module spells that vocabulary as a ``tokenizers`` JSON (a ``WordLevel`` model that
splits text into single characters; ``<pad>``, ``<bos>`` and the ``<unusedN>`` slots are
special tokens) and installs it into the HuggingFace hub cache under the repository id
``TOKENIZER_ID``, in the cache's own layout
(``models--jaxreg--base/refs/main`` and ``snapshots/<revision>/``). After that,
``transformers.AutoTokenizer.from_pretrained("jaxreg/base")`` loads it with
``HF_HUB_OFFLINE=1``, and so do the Tinker SDK's ``TrainingClient.get_tokenizer()`` (it
reads ``tokenizer_id`` from ``get_info``) and tinker-cookbook's
``tokenizer_utils.get_tokenizer("jaxreg/base")``.

Example:
    >>> import json
    >>> spec = json.loads(tokenizer_json())
    >>> spec["model"]["vocab"]["7"] == 4 + 7
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jaxreg.service.tasks import VOCAB

__all__ = ["TOKENIZER_ID", "hub_cache_dir", "install_tokenizer", "tokenizer_json"]

TOKENIZER_ID = "jaxreg/base"
"""The HuggingFace repository id the base model's tokenizer is installed under."""

_SPECIAL = [s for s in VOCAB if s.startswith("<")]


def tokenizer_json() -> str:
    """The base vocabulary as a HuggingFace ``tokenizers`` JSON document.

    Returns:
        The ``tokenizer.json`` text: a ``WordLevel`` model over ``tasks.VOCAB``
        (token id = position in the vocabulary), a pre-tokenizer that isolates every
        character, a ``Fuse`` decoder (decoding concatenates symbols), and the
        ``<...>`` symbols as special added tokens.
    """
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": VOCAB.index(s),
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for s in _SPECIAL
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": "[\\s\\S]"},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "WordLevel",
            "vocab": {s: i for i, s in enumerate(VOCAB)},
            "unk_token": "<unused0>",
        },
    }
    return json.dumps(spec, indent=1, ensure_ascii=True)


def _tokenizer_config() -> str:
    return json.dumps(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>",
            "eos_token": "\n",
            "pad_token": "<pad>",
            "unk_token": "<unused0>",
            "model_max_length": 4096,
            "clean_up_tokenization_spaces": False,
        },
        indent=1,
    )


def hub_cache_dir() -> Path:
    """The HuggingFace hub cache directory, resolved as ``huggingface_hub`` does.

    Returns:
        ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def install_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the base tokenizer into the HuggingFace hub cache under ``TOKENIZER_ID``.

    Idempotent: the revision is a hash of the files, so reinstalling writes the same
    snapshot; ``refs/main`` points at it.

    Args:
        cache_dir: The hub cache; defaults to ``hub_cache_dir``.

    Returns:
        The snapshot directory (also a path ``AutoTokenizer.from_pretrained`` accepts).
    """
    files = {
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": _tokenizer_config(),
        # AutoTokenizer reads config.json first (offline, a missing one is an error).
        "config.json": json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": len(VOCAB)}, indent=1
        ),
    }
    digest = hashlib.sha1("".join(files[k] for k in sorted(files)).encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo = root / ("models--" + TOKENIZER_ID.replace("/", "--"))
    snap = repo / "snapshots" / digest
    snap.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = snap / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(digest)
    return snap
