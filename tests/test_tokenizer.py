"""The base tokenizer in HF format: AutoTokenizer loads it offline and agrees with tasks."""

import os
import subprocess
import sys

import pytest

from jaxreg.service import tasks
from jaxreg.service.tokenizer import TOKENIZER_ID, install_tokenizer

pytest.importorskip("transformers")

_CHECK = """
import json, sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1])
texts = ["12>21\\n", "C0123>0123\\n", "S9>9", ""]
print(json.dumps({"ids": [t.encode(s, add_special_tokens=False) for s in texts],
                  "dec": [t.decode(t.encode(s, add_special_tokens=False)) for s in texts],
                  "bos": t.encode("<bos>", add_special_tokens=False),
                  "n": len(t), "bos_id": t.bos_token_id, "eos_id": t.eos_token_id}))
"""


def test_autotokenizer_offline_from_hub_cache(tmp_path):
    snap = install_tokenizer(tmp_path)
    assert install_tokenizer(tmp_path) == snap  # idempotent
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, TOKENIZER_ID],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    texts = ["12>21\n", "C0123>0123\n", "S9>9", ""]
    assert got["ids"] == [tasks.encode(s) for s in texts]
    assert got["dec"] == texts
    assert got["bos"] == [tasks.VOCAB.index("<bos>")]
    assert got["n"] == tasks.VOCAB_SIZE == 32
    assert got["bos_id"] == tasks.VOCAB.index("<bos>")
    assert got["eos_id"] == tasks.VOCAB.index("\n")
