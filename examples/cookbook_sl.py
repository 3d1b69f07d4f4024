"""tinker-cookbook's supervised.train, unmodified, on a local jaxreg serve (reverse task).

Run: python examples/cookbook_sl.py LOG_DIR (with TINKER_API_KEY=tml-local, HF_HUB_OFFLINE=1).
"""

import asyncio
import sys

import chz
from tinker_cookbook import renderers, tokenizer_utils
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder

import jaxreg.cookbook  # noqa: F401  (registers the jaxreg/digits renderer)
from jaxreg.service import start, tasks


class DS(SupervisedDataset):
    def __init__(self, data):
        self.data = data

    def get_batch(self, i):
        return self.data[i * 4 : (i + 1) * 4]

    def __len__(self):
        return len(self.data) // 4


@chz.chz
class Builder(SupervisedDatasetBuilder):
    def __call__(self):
        tok = tokenizer_utils.get_tokenizer("jaxreg/base")
        r = renderers.get_renderer("jaxreg/digits", tok)
        ds = ["123", "4071", "98", "5550", "31", "77", "120", "9"]
        data = [
            conversation_to_datum(
                [
                    {"role": "user", "content": "R" + d},
                    {"role": "assistant", "content": tasks.answer("R", d)},
                ],
                r,
                64,
            )
            for d in ds
        ]
        return DS(data), None


srv = start(api_key="tml-local")
try:
    cfg = train.Config(
        log_path=sys.argv[1],
        model_name="jaxreg/base",
        recipe_name="t",
        renderer_name="jaxreg/digits",
        dataset_builder=Builder(),
        learning_rate=3e-3,
        lora_rank=4,
        base_url=srv.url,
        num_epochs=2,
        save_every=0,
        eval_every=0,
    )
    asyncio.run(train.main(cfg))
finally:
    srv.stop()
