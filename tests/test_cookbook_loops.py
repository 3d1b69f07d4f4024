"""The cookbook's loops, unmodified, over loopback HTTP (e2e): supervised.train, rl.train
(async, its default loss), preference.train_dpo and CheckpointManager's rolling deletes."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from cookbook_helpers import ROOT, example_env

pytest.importorskip("tinker_cookbook")
pytestmark = pytest.mark.e2e


def test_cookbook_supervised_train(tmp_path):
    env = example_env(tmp_path)
    log = tmp_path / "log"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cookbook_sl.py"), str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Training completed successfully" in text
    for code in ("404", "409"):
        assert f" {code} " not in text and f"status {code}" not in text.lower()
    rows = [json.loads(x) for x in (log / "metrics.jsonl").read_text().splitlines()]
    nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    assert len(nll) == 4 and all(math.isfinite(x) for x in nll)
    assert len(set(nll)) > 1  # metrics move
    assert (log / "checkpoints.jsonl").read_text().count("tinker://") >= 2


# ---------------------------------------------------------------- in-process loops
# rl.train (async, its default loss stable_reinforce), preference.train_dpo and
# CheckpointManager, unmodified, against a service in this process over loopback HTTP.

import asyncio  # noqa: E402
import logging  # noqa: E402

import chz  # noqa: E402
import numpy as np  # noqa: E402
import tinker  # noqa: E402
from tinker_cookbook import checkpoint_utils, renderers, tokenizer_utils  # noqa: E402
from tinker_cookbook.preference import train_dpo  # noqa: E402
from tinker_cookbook.rl import train as rl_train  # noqa: E402
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder  # noqa: E402
from tinker_cookbook.rl.types import RLDataset, RLDatasetBuilder  # noqa: E402
from tinker_cookbook.supervised.common import datum_from_model_input_weights  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilder, SupervisedDataset  # noqa: E402

import jaxreg.cookbook  # noqa: E402, F401  (registers the jaxreg/digits renderer)
from jaxreg.service import start, tasks  # noqa: E402
from jaxreg.service.sampling import StabilityRecords  # noqa: E402

MODEL, RENDERER, KEY = "jaxreg/base", "jaxreg/digits", "tml-local"
_DIGITS = ["12", "407", "98", "555", "31", "77", "120", "9", "64", "803", "2", "45"]


@pytest.fixture
def served(monkeypatch, tmp_path):
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    srv = start(state_dir=tmp_path / "state", api_key=KEY)
    try:
        yield srv
    finally:
        srv.stop()


def _no_refusals(caplog):
    """No 404 or 409 anywhere in the logs (httpx logs every response's status)."""
    bad = [
        r.getMessage()
        for r in caplog.records
        if any(f" {c} " in r.getMessage() or f"status {c}" in r.getMessage() for c in (404, 409))
    ]
    assert not bad, bad[:5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "404" in w or "409" in w], warnings[:5]


def _metrics(log_path):
    lines = (pathlib.Path(log_path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


class ReverseDigitsEnv(ProblemEnv):
    """``R<digits>`` -> the digits reversed; reward 1 for the right answer."""

    def __init__(self, renderer, digits):
        super().__init__(renderer, format_coef=0.1)
        self.digits = digits

    def get_question(self):
        return "R" + self.digits

    def check_answer(self, sample_str):
        return sample_str == tasks.answer("R", self.digits)

    def check_format(self, sample_str):
        return sample_str.isdigit()

    def get_reference_answer(self):
        return tasks.answer("R", self.digits)


class _ReverseDataset(RLDataset):
    def __init__(self, renderer, groups_per_batch, group_size):
        self.renderer, self.n, self.g = renderer, groups_per_batch, group_size

    def get_batch(self, index):
        digits = [_DIGITS[(index * self.n + j) % len(_DIGITS)] for j in range(self.n)]
        return [
            ProblemGroupBuilder(
                env_thunk=lambda d=d: ReverseDigitsEnv(self.renderer, d),
                num_envs=self.g,
                dataset_name="reverse",
            )
            for d in digits
        ]

    def __len__(self):
        return 4


@chz.chz
class ReverseDigitsBuilder(RLDatasetBuilder):
    groups_per_batch: int = 2
    group_size: int = 4

    async def __call__(self):
        renderer = renderers.get_renderer(RENDERER, tokenizer_utils.get_tokenizer(MODEL))
        return _ReverseDataset(renderer, self.groups_per_batch, self.group_size), None


def test_cookbook_rl_train_async_default_loss(served, tmp_path, caplog, monkeypatch):
    """rl.train in async mode with its default loss (stable_reinforce): the sampler
    records stability info, the datums carry provenance, the service trains on them."""
    caplog.set_level(logging.INFO)
    resolved = []  # the sampled targets each stable_reinforce datum's provenance names
    original = StabilityRecords.resolve

    def resolve(self, *args, **kwargs):
        q, sampled = original(self, *args, **kwargs)
        resolved.append(int(sampled.sum()))
        return q, sampled

    monkeypatch.setattr(StabilityRecords, "resolve", resolve)
    async_config = rl_train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2)
    assert async_config.loss_fn == "stable_reinforce"  # the cookbook's default
    cfg = rl_train.Config(
        learning_rate=1e-2,
        dataset_builder=ReverseDigitsBuilder(),
        model_name=MODEL,
        recipe_name="jaxreg_reverse",
        renderer_name=RENDERER,
        max_tokens=6,
        log_path=str(tmp_path / "rl"),
        lora_rank=4,
        base_url=served.url,
        async_config=async_config,
        eval_every=0,
        save_every=0,
        num_groups_to_log=0,
        rollout_json_export=False,
        max_steps=3,
    )
    asyncio.run(rl_train.main(cfg))
    _no_refusals(caplog)
    # 3 steps x 2 groups x 4 rollouts, each with at least one sampled token
    assert len(resolved) >= 24 and min(resolved) >= 1, resolved
    rows = [r for r in _metrics(cfg.log_path) if "env/all/reward/total" in r]
    assert len(rows) == 3, rows
    for key in ("env/all/reward/total", "optim/entropy"):
        values = [r[key] for r in rows if key in r]
        assert values and all(math.isfinite(v) for v in values), (key, values)
    moving = [k for k in rows[0] if k.startswith(("optim/", "env/")) and len(
        {r.get(k) for r in rows}) > 1]  # fmt: skip
    assert moving, rows


class _Pairs(SupervisedDataset):
    def __init__(self, data, pairs_per_batch):
        self.data, self.k = data, 2 * pairs_per_batch

    def get_batch(self, index):
        return self.data[index * self.k : (index + 1) * self.k]

    def __len__(self):
        return len(self.data) // self.k


@chz.chz
class ReversePreferenceBuilder(ChatDatasetBuilder):
    """Chosen: the reversed digits; rejected: the digits copied (chosen first)."""

    def __call__(self):
        data = []
        for d in _DIGITS[:6]:
            prompt = [{"role": "user", "content": "R" + d}]
            for answer in (tasks.answer("R", d), d + "1"):
                convo = [*prompt, {"role": "assistant", "content": answer}]
                tokens, weights = self.renderer.build_supervised_example(convo)
                data.append(datum_from_model_input_weights(tokens, weights, 64))
        return _Pairs(data, pairs_per_batch=2), None


def test_cookbook_train_dpo(served, tmp_path, caplog):
    """preference.train_dpo: the SDK's forward_backward_custom, the reference model's
    compute_logprobs, rolling checkpoints."""
    caplog.set_level(logging.INFO)
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=MODEL, renderer_name=RENDERER, max_length=64, batch_size=4
    )
    cfg = train_dpo.Config(
        log_path=str(tmp_path / "dpo"),
        model_name=MODEL,
        recipe_name="jaxreg_dpo",
        dataset_builder=ReversePreferenceBuilder(common_config=common),
        renderer_name=RENDERER,
        learning_rate=1e-2,
        num_epochs=1,
        dpo_beta=0.5,
        lora_rank=4,
        num_replicas=1,
        base_url=served.url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
        rolling_save_every=1,
    )
    train_dpo.main(cfg)
    _no_refusals(caplog)
    rows = [r for r in _metrics(cfg.log_path) if "dpo_loss" in r]
    assert len(rows) == 3, rows
    losses = [r["dpo_loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) > 1, losses
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 0


def test_cookbook_checkpoint_manager_rolling_deletes(served, tmp_path, caplog):
    """CheckpointManager: rolling saves delete their predecessor over REST, the final
    save deletes the last one; only periodic and final checkpoints remain."""
    caplog.set_level(logging.INFO)
    service = tinker.ServiceClient(base_url=served.url)
    training = service.create_lora_training_client(base_model=MODEL, rank=4).result()
    log_path = str(tmp_path / "ckpt")
    os.makedirs(log_path)  # the cookbook's loops create it (ml_log.setup_logging)
    mgr = checkpoint_utils.CheckpointManager(
        training_client=training,
        service_client=service,
        log_path=log_path,
        save_every=3,
        rolling_save_every=1,
    )
    data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints(e.tokens.tolist()),
            loss_fn_inputs={"target_tokens": e.targets.astype(np.int64), "weights": e.answer_mask},
        )
        for e in tasks.make_examples("R", 2, seed=0, min_digits=2, max_digits=3)
    ]

    async def loop():
        for step in range(1, 6):
            fb = training.forward_backward(data, "cross_entropy")
            opt = training.optim_step(tinker.AdamParams(learning_rate=1e-3))
            await fb
            await opt
            await mgr.maybe_save_async(step, {"step": step})
        return await mgr.save_final_async({"step": 5})

    final = asyncio.run(loop())
    _no_refusals(caplog)
    run_id = training.model_id
    rest = tinker.RestClient(base_url=served.url, api_key=KEY)
    names = sorted(c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints)
    # periodic 000003 (state and sampler weights) and final; rolling 1, 2, 4, 5 deleted
    assert names == sorted(
        ["weights/000003", "sampler_weights/000003", "weights/final", "sampler_weights/final"]
    ), names
    records = checkpoint_utils.load_checkpoints_file(log_path)
    assert [r.name for r in records][-1] == "final" and final["state_path"].startswith("tinker://")
    service.close("success").result(timeout=30)
