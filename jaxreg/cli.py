"""Command line: ``jaxreg demo`` (and ``python -m jaxreg demo``)."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _table(out) -> str:
    d = out.to_dict()
    total_norm = d.get("total_grad_norm")
    rows = [("term", "value", "weight", "contribution", "grad_norm", "w*norm / |grad|")]
    entries = []
    if "base_loss" in d:
        entries.append((out.base_loss.name, {**d["base_loss"], "weight": 1.0}))
    entries += list(d["regularizers"].items())
    for name, e in entries:
        contribution = e.get("contribution", e["value"] * e["weight"])
        norm = e.get("grad_norm")
        weighted = None if norm is None else e["weight"] * norm
        share = "" if not total_norm or weighted is None else f"{weighted / total_norm:.1%}"
        rows.append(
            (
                name,
                f"{e['value']:.4f}",
                f"{e['weight']:g}",
                f"{contribution:.4f}",
                "" if norm is None else f"{norm:.4f}",
                share,
            )
        )
    rows.append(("total", f"{d['loss_total']:.4f}", "", "", f"{total_norm or 0:.4f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> int:
    """Composes NLL + KL + entropy + smoothness on a ragged logprob batch; prints metrics."""
    import jaxreg as jr

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(16, 120, size=args.batch)
    logprobs = [-rng.gamma(2.0, 0.5, n).astype(np.float32) for n in lengths]
    inputs = {
        "weights": [np.ones(n, np.float32) for n in lengths],
        "ref_logprobs": [lp + rng.normal(0, 0.3, lp.shape).astype(np.float32) for lp in logprobs],
    }
    x, batch = jr.Batch.from_ragged(logprobs, inputs)
    objective = jr.compose(
        jr.Term("nll", jr.losses.cross_entropy(reduction="token_mean")),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs"), weight=0.1),
            jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
            jr.Term("smooth", jr.regularizers.smoothness, weight=0.05),
        ],
        track_grad_norms=True,
        grad_conflicts=True,
    )
    print(f"jaxreg demo: {args.batch} datums, {lengths.sum()} tokens, padded to {x.shape}")
    print(f"objective: {objective}\n")
    for step, kl_weight in enumerate([0.1, 0.5, 2.0]):
        out = objective(x, batch, weights={"kl": kl_weight})
        print(f"step {step}: kl weight {kl_weight} (same compiled program)")
        print(_table(out))
        cos = out.to_dict()["grad_cosines"]
        print(f"gradient cosine nll/kl: {cos['nll']['kl']:+.3f}\n")
    print(f"compiled {objective.trace_count} time(s) for {step + 1} calls")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxreg", description="jaxreg command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compose a loss with regularizers and print its metrics")
    p.add_argument("--batch", type=int, default=8, help="number of datums (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
