"""The demo's report image: what each term did over the run, and what the KL weight buys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_report(metrics_path: Path, summary: dict[str, Any], image: Path) -> Path:
    """Plots per-term contributions, grad norms, gradient cosines and the KL sweep.

    The first three panels show the middle run of the sweep, step by step (norms and
    cosines in parameter space, from the reference service's extension); the last
    shows held-out accuracy on the new task (increment) and on the base skills (copy and
    reverse) for every KL weight over the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _load(metrics_path)
    weights = [r["kl_weight"] for r in summary["runs"]]
    mid = weights[len(weights) // 2]
    run = [r for r in records if r["kl_weight"] == mid]
    steps = [r["step"] for r in run]
    terms = sorted({k.split("/")[1] for r in run for k in r if k.startswith("regularizers/")})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)

    ax = axes[0, 0]
    ax.plot(steps, [r["base_loss/value"] for r in run], label="nll (base loss)", color="k")
    for t in terms:
        ax.plot(steps, [r[f"regularizers/{t}/contribution"] for r in run], label=t)
    ax.set(title=f"contribution to the loss (kl weight {mid:g})", xlabel="step")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.legend()

    # Parameter space on the steps the service measured it; else the objective's own space.
    measured = [r for r in run if "param/nll/grad_norm" in r]
    space = bool(measured)
    norm_run = measured if space else run
    norm_steps = [r["step"] for r in norm_run]

    def norm(r, t):
        return r[f"param/{t}/grad_norm"] if space else r[f"{_prefix(t)}grad_norm"]

    ax = axes[0, 1]
    ax.semilogy(norm_steps, [norm(r, "nll") for r in norm_run], label="nll", color="k")
    for t in terms:
        ax.semilogy(
            norm_steps,
            [max(r[f"regularizers/{t}/weight"] * norm(r, t), 1e-12) for r in norm_run],
            label=f"{t} (weighted)",
        )
    total = [r["param/total_grad_norm" if space else "total_grad_norm"] for r in norm_run]
    ax.semilogy(norm_steps, total, "--", color="0.5", label="total")
    where = "the model's parameters" if space else "the logprobs"
    ax.set(title=f"gradient norms w.r.t. {where}", xlabel="step")
    ax.legend()

    ax = axes[1, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(terms):
        c = colors[i % len(colors)]  # as in the norms panel
        if space:
            cos = [r[f"param/cos/nll/{t}"] for r in measured]
            ax.plot(norm_steps, cos, color=c, label=f"cos(nll, {t})")
        ax.plot(
            steps,
            [r["grad_cosines"]["nll"][t] for r in run],
            ":",
            color=c,
            lw=0.8,
            label=f"cos(nll, {t}), logit space",
        )
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set(
        title="gradient cosines with the base loss: parameters (solid), logits (dotted)",
        xlabel="step",
        ylim=(-1.05, 1.05),
    )
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    for i, entry in enumerate(summary["runs"]):
        ev = entry["evals"]
        c = colors[i % len(colors)]
        ax.plot(
            [e["step"] for e in ev],
            [e["new"] for e in ev],
            "-o",
            ms=3,
            color=c,
            label=f"kl {entry['kl_weight']:g}: increment (new task)",
        )
        ax.plot(
            [e["step"] for e in ev],
            [e["base"] for e in ev],
            "--s",
            ms=3,
            color=c,
            label=f"kl {entry['kl_weight']:g}: copy+reverse (base skills)",
        )
    ax.set(title="held-out greedy accuracy", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    fig.suptitle("jaxreg demo: cross-entropy + KL + entropy + confidence on a remote service")
    fig.savefig(image, dpi=90)
    plt.close(fig)
    return image


def _prefix(term: str) -> str:
    return "base_loss/" if term == "nll" else f"regularizers/{term}/"
