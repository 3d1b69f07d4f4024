"""jaxreg's per-term metrics inside a tinker-cookbook loop, over loopback HTTP (e2e).

Runs ``examples/cookbook_jaxreg_terms.py`` (the cookbook's dataset builder, renderer,
logger and checkpoint helper, unmodified; the tinker SDK; ``jr.remote.forward_backward_custom``
with nll + KL + entropy) for a few steps in a subprocess (``HF_HUB_OFFLINE`` must hold
from the first import of huggingface_hub), then checks the cookbook logger's
``metrics.jsonl`` against a float64 NumPy recomputation from the logprobs the service
returned.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from cookbook_helpers import ROOT, example_env

pytest.importorskip("tinker_cookbook")
pytestmark = pytest.mark.e2e  # a service, a subprocess, 6 custom steps: ~45 s on 2 cores

STEPS = 6
ARGS = ["--batch-size", "8", "--learning-rate", "1e-2", "--lr-schedule", "constant"]

# Runs the example's main() and saves, for every step, what the loss was computed on.
_DRIVER = r"""
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("example", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
history = example.main([sys.argv[2], "--steps", sys.argv[4], *sys.argv[5:]])
arrays = {}
for i, (data, result) in enumerate(history):
    for j, (d, lp) in enumerate(zip(data, result.logprobs, strict=True)):
        for k in ("weights", "answer", "ref_logprobs"):
            arrays[f"{i}/{j}/{k}"] = d.loss_fn_inputs[k].to_numpy()
        arrays[f"{i}/{j}/logprobs"] = np.asarray(lp)
np.savez(sys.argv[3], **arrays)
"""


def _logit_space(g, p):
    """A logprob-space gradient mapped to logit space: ``g - p * sum_k g_k`` per position."""
    return g - p * g.sum(-1, keepdims=True)


def recompute(arrays, step: int, kl_weight: float, entropy_weight: float) -> dict[str, float]:
    """The objective's metrics in float64 from the returned ``[T, K]`` logprobs.

    nll = -sum w x;  kl = mean over answer positions of sum_k p_k (x_k - q_k);
    entropy = -(mean over all positions of -sum_k p_k x_k); gradient norms in logit space.
    """
    n = len({k.split("/")[1] for k in arrays if k.startswith(f"{step}/")})
    get = [{f: np.asarray(arrays[f"{step}/{j}/{f}"], np.float64) for f in
            ("weights", "answer", "ref_logprobs", "logprobs")} for j in range(n)]  # fmt: skip
    n_all = sum(len(d["logprobs"]) for d in get)
    n_answer = sum(d["answer"].sum() for d in get)
    nll = kl = ent = 0.0
    g_nll, g_kl, g_ent = [], [], []
    for d in get:
        x, q, w, a = d["logprobs"], d["ref_logprobs"], d["weights"], d["answer"][:, None]
        p = np.exp(x)
        nll += -(w * x).sum()
        kl += (a * p * (x - q)).sum() / n_answer
        ent += (p * x).sum() / n_all  # the loss is -H, H = -sum p x
        g_nll.append(_logit_space(-w, p))
        g_kl.append(_logit_space(a * p * (x - q + 1) / n_answer, p))
        g_ent.append(_logit_space(p * (x + 1) / n_all, p))
    g_total = [
        u + kl_weight * v + entropy_weight * z for u, v, z in zip(g_nll, g_kl, g_ent, strict=True)
    ]

    def norm(gs):
        return math.sqrt(sum((g**2).sum() for g in gs))

    total_weight = sum(d["weights"].sum() for d in get)
    return {
        "base_loss/value": nll,
        "regularizers/kl/value": kl,
        "regularizers/kl/contribution": kl_weight * kl,
        "regularizers/entropy/value": ent,
        "regularizers/entropy/custom/mean": -ent,
        "regularizers/entropy/contribution": entropy_weight * ent,
        "loss_total": nll + kl_weight * kl + entropy_weight * ent,
        "base_loss/grad_norm": norm(g_nll),
        "regularizers/kl/grad_norm": norm(g_kl),
        "regularizers/kl/grad_norm_weighted": kl_weight * norm(g_kl),
        "regularizers/entropy/grad_norm": norm(g_ent),
        "total_grad_norm": norm(g_total),
        # what the service computed with weights = -g: -sum(weights * x) = sum(g * x)
        "surrogate_loss:sum": sum(
            (g * d["logprobs"]).sum() for g, d in zip(g_total, get, strict=True)
        ),
        "train_mean_nll": nll / total_weight,  # -sum_t w_t log p(y_t) / sum_t w_t
    }


def test_cookbook_loop_logs_jaxreg_terms(tmp_path):
    env = example_env(tmp_path)
    log, dump = tmp_path / "log", tmp_path / "steps.npz"
    example = ROOT / "examples" / "cookbook_jaxreg_terms.py"
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(example), str(log), str(dump), str(STEPS), *ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert f"step {STEPS - 1:3d}" in out.stdout  # the progress lines
    for code in ("404", "409"):
        assert f" {code} " not in text and f"status {code}" not in text.lower()
    assert (log / "checkpoints.jsonl").read_text().count("tinker://") == 1

    rows = [json.loads(x) for x in (log / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss_total" in r]
    assert [r["step"] for r in rows] == list(range(STEPS))
    per_term = [
        f"{group}/{field}"
        for group in ("base_loss", "regularizers/kl", "regularizers/entropy")
        for field in ("value", "weight", "contribution", "grad_norm", "grad_norm_weighted")
    ]
    for r in rows:
        for key in [*per_term, "loss_total", "total_grad_norm", "train_mean_nll"]:
            assert key in r and math.isfinite(r[key]), (r["step"], key, r.get(key))
        assert r["regularizers/kl/weight"] == 0.5 and r["regularizers/entropy/weight"] == 0.05

    # Every step's logged per-term metrics match a float64 recomputation.
    arrays = dict(np.load(dump))
    for r in rows:
        expect = recompute(arrays, r["step"], kl_weight=0.5, entropy_weight=0.05)
        for key, value in expect.items():
            assert r[key] == pytest.approx(value, rel=2e-4, abs=2e-6), (r["step"], key)

    # The loss moves: the policy leaves the reference and learns the new task.
    nll = [r["train_mean_nll"] for r in rows]
    assert max(nll[-2:]) < nll[0] - 0.3, nll
    assert rows[0]["regularizers/kl/value"] == 0.0  # step 0: policy == reference
    assert rows[-1]["regularizers/kl/value"] > 0.05
