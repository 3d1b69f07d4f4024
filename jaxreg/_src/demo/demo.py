"""``jaxreg demo``: fine-tune the reference model with a composed objective, end to end.

The base model knows two skills (copy and reverse a digit string). The demo teaches
it a third (increment every digit) through a remote training service, with
cross-entropy plus three regularizers computed client-side by jaxreg on the full
next-token distribution (``[T, K]`` multi-target logprobs, ``K`` = the vocabulary):

* ``kl``: KL(policy ‖ base model), exact over the vocabulary, on replayed examples of
  the base skills mixed into every batch — keeps those skills;
* ``entropy``: an entropy bonus — keeps the answer distribution from collapsing;
* ``confidence``: a confidence penalty on probabilities above 0.999.

It runs the same objective (compiled once) for a sweep of KL weights and measures,
on held-out data, how well each model learned the new task and how much of
copy/reverse it kept. It writes ``metrics.jsonl``, ``summary.json`` and ``report.png`` into the run
directory and prints the per-term table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jaxreg as jr
from jaxreg._src.remote.wire import Datum

TARGET = "I"  # the new task: increment every digit
VOCAB_K = 32  # every token is a candidate: exact KL and entropy over the vocabulary


@dataclasses.dataclass
class DemoConfig:
    """The demo's settings (``jaxreg demo --help`` lists them).

    Chosen so that the sweep's table is stable across seeds (``benchmarks/demo_seeds.py``
    measures it): Adam at a peak learning rate of 5e-4 with a short warmup and cosine
    decay to 0 (at a constant 1e-3, held-out accuracies swung by up to 86 points between
    evaluations), 300 steps per KL weight, and 192 held-out examples per task.
    Parameter-space gradient norms and cosines (a reference-service extension costing
    about 3x a step) are measured every ``diagnose_every`` steps (0: never).
    """

    steps: int = 300
    kl_weights: tuple[float, ...] = (0.0, 0.3, 3.0)
    batch_size: int = 16
    replay: int = 8
    learning_rate: float = 5e-4
    warmup: int = 10
    eval_every: int = 50
    eval_size: int = 192
    diagnose_every: int = 10
    seed: int = 0
    out: Path | None = None
    base_url: str | None = None
    api_key: str | None = None
    progress: bool = True
    sdk: str = "jaxreg"  # or "tinker": the official SDK against the same service


def _multi_target(e, *, learn: bool) -> Datum:
    """A datum whose targets are the whole vocabulary at every position.

    ``learn``: a datum of the new task (one-hot NLL weights on its answer) or a
    replayed datum of a base skill (no NLL weight; the KL term anchors it).
    """
    t = len(e.tokens)
    targets = np.broadcast_to(np.arange(VOCAB_K, dtype=np.int64), (t, VOCAB_K)).copy()
    weights = np.zeros((t, VOCAB_K), np.float32)
    kl_mask = np.zeros(t, np.float32)
    if learn:
        weights[np.arange(t), e.targets] = e.answer_mask
    else:
        kl_mask[:] = 1.0
    return Datum(e.tokens, {"target_tokens": targets, "weights": weights, "kl_mask": kl_mask})


def _eval_datum(e) -> Datum:
    return Datum(e.tokens, {"target_tokens": e.targets.astype(np.int64), "weights": e.answer_mask})


def objective() -> jr.Objective:
    """The demo's objective: NLL on the answers plus KL, entropy and confidence terms."""
    return jr.compose(
        jr.Term("nll", jr.losses.cross_entropy(reduction="token_mean")),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs", where="kl_mask"), weight=0.3),
            jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
            jr.Term("confidence", jr.regularizers.confidence_penalty(max_prob=0.999), weight=0.01),
        ],
        track_grad_norms=True,
        grad_conflicts=True,
        term_grads=True,  # each term's cotangent, for the service's parameter-space norms
        grad_space="logits",  # [T, K] targets span the vocabulary: report what moves the model
    )


class Evaluator:
    """Held-out greedy accuracy per task, from one ``forward`` (teacher forcing).

    An answer is exactly what greedy decoding produces iff every answer token has
    probability above 1/2 given the correct prefix — so ``forward`` logprobs suffice.
    """

    def __init__(self, seed: int, n: int = 96):
        from jaxreg.service import tasks

        self.examples = {
            t: tasks.make_examples(t, n, seed=10_000 + seed) for t in (TARGET, "C", "R")
        }
        self.data = [_eval_datum(e) for ex in self.examples.values() for e in ex]

    def __call__(self, training) -> dict[str, float]:
        outs = training.forward(self.data).result()["loss_fn_outputs"]
        scores, i = {}, 0
        for task, examples in self.examples.items():
            ok = []
            for e in examples:
                lp = outs[i]["logprobs"]
                ok.append(bool(np.all(lp[e.answer_mask > 0] > np.log(0.5))))
                i += 1
            scores[task] = float(np.mean(ok))
        return {
            "new": scores[TARGET],
            "base": (scores["C"] + scores["R"]) / 2,
            "copy": scores["C"],
            "reverse": scores["R"],
        }


@contextlib.contextmanager
def _service(cfg: DemoConfig, out: Path) -> Iterator[str]:
    if cfg.base_url:
        yield cfg.base_url
        return
    from jaxreg.service import start

    key = cfg.api_key if cfg.sdk == "tinker" else None  # the SDK always sends a key
    with start(state_dir=out / "states", api_key=key) as server:
        yield server.url


def learning_rate(cfg: DemoConfig, step: int) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then cosine decay to 0 at the last step.

    The decay makes the end-of-run evaluation a property of the objective, not of where
    Adam's last large step happened to land.
    """
    if step < cfg.warmup:
        return cfg.learning_rate * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.learning_rate * 0.5 * (1.0 + float(np.cos(np.pi * progress)))


class _TinkerModel:
    """A ``tinker.TrainingClient`` with the jaxreg client calls the demo makes."""

    def __init__(self, client):
        from jaxreg._src.remote.tinker import TinkerTrainingClient

        self.adapter = TinkerTrainingClient(client)

    def forward(self, data):
        return self.adapter.forward(data)

    def optim_step(self, adam):
        from tinker import types

        return self.adapter.client.optim_step(types.AdamParams(**adam))


class _TinkerService:
    """``create_model`` on the official SDK: a full-parameter (``rank=0``) training client."""

    def __init__(self, url: str, api_key: str):
        import tinker

        self.service = tinker.ServiceClient(base_url=url, api_key=api_key)

    def create_model(self) -> _TinkerModel:
        from jaxreg.service import BASE_MODEL

        return _TinkerModel(
            self.service.create_lora_training_client(base_model=BASE_MODEL, rank=0).result()
        )

    def __enter__(self) -> _TinkerService:
        return self

    def __exit__(self, *exc) -> None:
        self.service.close("success").result()


def _client(cfg: DemoConfig, url: str):
    if cfg.sdk == "tinker":
        return _TinkerService(url, cfg.api_key or "")
    return jr.remote.ServiceClient(url, cfg.api_key)


def term_table(out: jr.CompositeOutput, param: Any = None) -> str:
    """A per-term table: value, weight, contribution, and each term's gradient.

    Gradient columns: the norm in the objective's own space (``out.grad_space``: logit
    space in the demo) and, when ``param`` (a [`ParamDiagnostics`][jaxreg.remote.ParamDiagnostics])
    is given, the norm in parameter space, the term's weighted share of the update's norm
    and its cosine with the base loss there.
    """
    d = out.to_dict()
    total_norm = d.get("total_grad_norm") or 0.0
    space = d.get("grad_space", "x")
    header = ["term", "value", "weight", "contribution", f"|grad| ({space})"]
    if param is not None:
        header += ["|grad| (params)", "share of |update|", "cos(base, term) (params)"]
    rows = [tuple(header)]
    entries = []
    if "base_loss" in d:
        entries.append((out.term_names[0], d["base_loss"]))
    entries += list(d["regularizers"].items())
    base_name = entries[0][0]
    for name, e in entries:
        contribution = e["contribution"]
        norm = e.get("grad_norm")
        row = [
            name,
            f"{e['value']:.4f}",
            f"{e['weight']:g}",
            f"{contribution:+.4f}",
            "" if norm is None else f"{norm:.4f}",
        ]
        if param is not None:
            pnorm = param.grad_norms[name]
            share = e["weight"] * pnorm / param.total_grad_norm if param.total_grad_norm else 0
            cos = "" if name == base_name else f"{param.cosine(base_name, name):+.3f}"
            row += [f"{pnorm:.4f}", f"{share:.1%}", cos]
        rows.append(tuple(row))
    total = ["total", f"{d['loss_total']:.4f}", "", "", f"{total_norm:.4f}"]
    if param is not None:
        total += [f"{param.total_grad_norm:.4f}", "", ""]
    rows.append(tuple(total))
    return _format(rows)


def _format(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Runs the demo; returns the summary written to ``summary.json``."""
    try:
        import matplotlib  # noqa: F401  (the report)
        from tqdm import tqdm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("jaxreg demo needs its extra: pip install 'jaxreg[demo]'") from e

    from jaxreg.service import tasks

    if cfg.sdk == "tinker" and not cfg.api_key:
        cfg = dataclasses.replace(cfg, api_key="tml-jaxreg-demo")  # the SDK's key format
    # Parameter-space norms and cosines come from a jaxreg-service extension, which the
    # official SDK cannot send.
    param_space = cfg.sdk != "tinker"
    out = cfg.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    new = [_multi_target(e, learn=True) for e in tasks.make_examples(TARGET, 512, seed=cfg.seed)]
    old = [
        _multi_target(e, learn=False)
        for t in ("C", "R")
        for e in tasks.make_examples(t, 256, seed=cfg.seed)
    ]
    evaluate = Evaluator(cfg.seed, cfg.eval_size)
    obj = objective()
    adam = {"learning_rate": cfg.learning_rate, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    started = time.perf_counter()
    print(f"jaxreg demo: run directory {out}")
    print(f"objective: {obj}")
    summary: dict[str, Any] = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items()
            if k != "api_key"
        },
        "runs": [],
    }
    with (
        _service(cfg, out) as url,
        _client(cfg, url) as client,
        open(out / "metrics.jsonl", "w") as log,
    ):
        print(f"service: {url}")
        reference = client.create_model()  # never trained: the base model's logprobs
        targets_only = [
            Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in new + old
        ]
        ref = reference.forward(targets_only).result()["loss_fn_outputs"]
        pool = [
            d.replace_inputs(ref_logprobs=r["logprobs"])
            for d, r in zip(new + old, ref, strict=True)
        ]
        new, old = pool[: len(new)], pool[len(new) :]
        before = evaluate(reference)
        print(
            f"base model, held-out greedy accuracy: increment {before['new']:.0%}, "
            f"copy {before['copy']:.0%}, reverse {before['reverse']:.0%}\n"
        )
        summary["before"] = before
        last_outputs = {}
        for kl_weight in cfg.kl_weights:
            training = client.create_model()
            weights = {"kl": kl_weight}
            evals = [{"step": 0, **before}]
            param_log = []
            bar = tqdm(
                range(cfg.steps),
                desc=f"kl={kl_weight:g}",
                disable=not cfg.progress,
                dynamic_ncols=True,
                file=sys.stdout,
            )
            for step in bar:
                batch = [new[i] for i in rng.choice(len(new), cfg.batch_size, replace=False)]
                batch += [old[i] for i in rng.choice(len(old), cfg.replay, replace=False)]
                target = training.adapter if isinstance(training, _TinkerModel) else training
                # Parameter-space diagnostics cost one extra backward per term (about 3x a
                # step): measured every ``diagnose_every`` steps and on the last.
                diagnose = (
                    param_space
                    and cfg.diagnose_every > 0
                    and (step % cfg.diagnose_every == 0 or step + 1 == cfg.steps)
                )
                fut = jr.remote.forward_backward_custom(
                    target, batch, obj, weights=weights, param_diagnostics=diagnose
                )
                lr = learning_rate(cfg, step)
                opt = training.optim_step({**adam, "learning_rate": lr})  # after the backward
                result = fut.result()
                opt.result()
                d = result.output.to_dict()
                record = {
                    "kl_weight": kl_weight,
                    "step": step + 1,
                    **result.metrics,
                    "grad_cosines": d.get("grad_cosines"),
                }
                if result.param_diagnostics is not None:
                    param_log.append(result.param_diagnostics.metrics())
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    evals.append({"step": step + 1, **evaluate(training)})
                    record["eval"] = evals[-1]
                log.write(json.dumps(record) + "\n")
                bar.set_postfix_str(
                    f"loss {d['loss_total']:.3f} | nll {d['base_loss']['value']:.3f} | "
                    + " | ".join(
                        f"{k} {v['contribution']:+.3f}" for k, v in d["regularizers"].items()
                    )
                )
            bar.close()
            last_outputs[kl_weight] = result
            final = evals[-1]
            print(
                f"  held-out greedy accuracy: increment {final['new']:.0%}, "
                f"copy {final['copy']:.0%}, reverse {final['reverse']:.0%}"
            )
            entry = {"kl_weight": kl_weight, "evals": evals, "final": result.output.to_dict()}
            if param_log and result.param_diagnostics is not None:
                cos = [r["param/cos/nll/kl"] for r in param_log]
                entry["final_params"] = result.param_diagnostics.to_dict()
                entry["param_cos_nll_kl"] = [
                    float(np.mean(cos)),
                    float(np.min(cos)),
                    float(np.max(cos)),
                ]
            summary["runs"].append(entry)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["compiles"] = obj.trace_count
    mid = cfg.kl_weights[len(cfg.kl_weights) // 2]
    print(f"\nlast step of the kl={mid:g} run:")
    print(term_table(last_outputs[mid].output, last_outputs[mid].param_diagnostics))
    print("\nKL weight sweep (held-out greedy accuracy after training):")
    rows = [
        (
            "kl weight",
            "increment (learned)",
            "copy (kept)",
            "reverse (kept)",
            "cos(nll, kl) in params: mean [min, max]",
        )
    ]
    rows.append(
        (
            "base model",
            f"{before['new']:.0%}",
            f"{before['copy']:.0%}",
            f"{before['reverse']:.0%}",
            "",
        )
    )
    for r in summary["runs"]:
        f = r["evals"][-1]
        mean, low, high = r.get("param_cos_nll_kl", (np.nan, np.nan, np.nan))
        rows.append(
            (
                f"{r['kl_weight']:g}",
                f"{f['new']:.0%}",
                f"{f['copy']:.0%}",
                f"{f['reverse']:.0%}",
                f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]",
            )
        )
    print(_format(rows))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    from jaxreg._src.demo.report import write_report

    image = write_report(out / "metrics.jsonl", summary, out / "report.png")
    print(
        f"\n{summary['seconds']}s, objective compiled {obj.trace_count} time(s) for "
        f"{cfg.steps * len(cfg.kl_weights)} steps; wrote {out / 'metrics.jsonl'}, "
        f"{out / 'summary.json'}, {image}"
    )
    return summary


def main(args) -> int:
    if args.tinker:
        return _tinker_main(args)
    cfg = DemoConfig(
        steps=args.steps,
        kl_weights=tuple(args.kl_weights),
        batch_size=args.batch,
        replay=args.replay,
        learning_rate=args.lr,
        warmup=min(args.warmup, args.steps),
        eval_every=max(1, min(args.eval_every, args.steps)),
        eval_size=args.eval_size,
        diagnose_every=args.diagnose_every,
        seed=args.seed,
        out=Path(args.out) if args.out else None,
        base_url=args.base_url,
        api_key=args.api_key or os.environ.get("JAXREG_API_KEY"),
        progress=not args.no_progress,
        sdk=getattr(args, "sdk", "jaxreg"),
    )
    run(cfg)
    return 0


def _tinker_main(args) -> int:
    """The same loop on Tinker through the official SDK (needs ``TINKER_API_KEY``)."""
    if not os.environ.get("TINKER_API_KEY"):
        print(
            "jaxreg demo --tinker: set TINKER_API_KEY (and pip install 'jaxreg[tinker]')",
            file=sys.stderr,
        )
        return 2
    if not args.base_model:
        print("jaxreg demo --tinker: give --base-model NAME (e.g. Qwen/Qwen3-8B)", file=sys.stderr)
        return 2
    import tinker
    import tinker.types as types

    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=args.base_model)
    tokenizer = training.get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tokenizer.encode(text)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(ids[1:], np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(ids) - 1, np.float32)),
        },
    )
    obj = jr.compose(
        jr.Term("nll", jr.losses.cross_entropy(reduction="token_mean")),
        [
            jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
            jr.Term("smooth", jr.regularizers.smoothness, weight=0.01),
            jr.Term("confidence", jr.regularizers.confidence_penalty, weight=0.01),
        ],
        track_grad_norms=True,
    )
    for step in range(args.steps):
        result = jr.remote.forward_backward_custom(training, [datum], obj).result()
        training.optim_step(types.AdamParams(learning_rate=1e-5)).result()
        print(f"step {step + 1}: loss {result.metrics['loss:sum']:.4f}")
    print(term_table(result.output))
    return 0
