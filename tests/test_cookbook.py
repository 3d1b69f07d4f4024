"""tinker-cookbook on the local service: tokenizer, renderer and model name, no user glue.

Runs in a subprocess so that ``HF_HUB_OFFLINE``/``HF_HUB_CACHE`` apply from the first
import of huggingface_hub (it reads them once).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tinker_cookbook")
pytestmark = pytest.mark.e2e  # a service + a subprocess with transformers: ~30 s

_SCRIPT = r"""
import json, math
import tinker
import jaxreg.cookbook  # the one documented import: renderer + tokenizer
from jaxreg.service import start, tasks
from tinker_cookbook import renderers, tokenizer_utils
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.renderers.base import TrainOnWhat

srv = start()
service = tinker.ServiceClient(base_url=srv.url, api_key="tml-local")
try:
    name = jaxreg.cookbook.MODEL_NAME
    training = service.create_lora_training_client(base_model=name, rank=4).result()
    sdk_tok = training.get_tokenizer()  # via get_info's tokenizer_id
    cb_tok = tokenizer_utils.get_tokenizer(jaxreg.cookbook.MODEL_NAME)
    r = renderers.get_renderer(jaxreg.cookbook.RENDERER_NAME, cb_tok)
    digits = ("123", "4071", "98", "5550")
    convs = [[{"role": "user", "content": "R" + d},
              {"role": "assistant", "content": tasks.answer("R", d)}] for d in digits]
    last = TrainOnWhat.LAST_ASSISTANT_MESSAGE
    data = [conversation_to_datum(c, r, max_length=64, train_on_what=last) for c in convs]
    losses = []
    for _ in range(4):
        fb = training.forward_backward(data, "cross_entropy").result(timeout=120)
        training.optim_step(tinker.types.AdamParams(learning_rate=3e-3)).result(timeout=120)
        losses.append(fb.metrics["loss:sum"])
    print(json.dumps({
        "sdk": sdk_tok.encode("R12>21\n", add_special_tokens=False),
        "cb": cb_tok.encode("R12>21\n", add_special_tokens=False),
        "ref": tasks.encode("R12>21\n"),
        "tokens": [d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].data[-1]]
                   for d in data],
        "texts": ["<bos>" + tasks.decode(tasks.make_example("R", d).targets) for d in digits],
        "losses": losses,
    }))
finally:
    service.close("success").result(timeout=30) if hasattr(service, "close") else None
    srv.stop()
"""


def test_cookbook_tokenizer_renderer_and_sft_steps(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sdk"] == got["cb"] == got["ref"]
    from jaxreg.service import tasks

    assert [tasks.decode(t) for t in got["tokens"]] == got["texts"]
    losses = got["losses"]
    assert all(x == x and abs(x) < 1e9 for x in losses)
    assert losses[-1] < losses[0]
    assert "404" not in out.stderr and "409" not in out.stderr
