"""Cost of the ``param_grad_diagnostics`` extension against a plain ``forward_backward``.

At the demo's sizes (16 datums of the new task + 8 replayed, full-vocabulary ``[T, 32]``
targets, the demo's four-term objective), on the reference service over loopback HTTP,
measured round-robin so that the shared machine's drift hits every variant alike:

* ``forward_backward`` request: the same linearised datums, plain against with the
  extension field (four terms' cotangents); wall time of submit + result, and the
  service's own ``compute_s`` (one batched backward, Gramian, accumulation);
* the whole ``forward_backward_custom`` step (forward, client-side objective, backward):
  the demo's objective as it is, against the same objective with ``term_grads=True``
  and ``param_diagnostics=True``.

Run: ``python -m benchmarks.param_diagnostics_bench`` (prints a Markdown table).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import jaxreg as jr
from benchmarks.common import table
from jaxreg._src.demo.demo import _multi_target
from jaxreg._src.demo.demo import objective as demo_objective
from jaxreg._src.remote.custom import _Step
from jaxreg._src.remote.wire import Datum
from jaxreg.service import start, tasks

BATCH, REPLAY, ROUNDS = 16, 8, 12


def _batches(reference, n_batches: int = 4) -> list[list[Datum]]:
    """The demo's batches: 16 increment datums + 8 copy/reverse, with base logprobs."""
    new = [_multi_target(e, learn=True) for e in tasks.make_examples("I", 64, seed=0)]
    old = [
        _multi_target(e, learn=False)
        for t in ("C", "R")
        for e in tasks.make_examples(t, 32, seed=0)
    ]
    pool = new + old
    ref = reference.forward(
        [Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in pool]
    ).result()["loss_fn_outputs"]
    pool = [d.replace_inputs(ref_logprobs=r["logprobs"]) for d, r in zip(pool, ref, strict=True)]
    new, old = pool[: len(new)], pool[len(new) :]
    rng = np.random.default_rng(0)
    return [
        [new[i] for i in rng.choice(len(new), BATCH, replace=False)]
        + [old[i] for i in rng.choice(len(old), REPLAY, replace=False)]
        for _ in range(n_batches)
    ]


def _linearised(training, data, objective):
    """The backward request's datums and extension field, as the client builds them."""
    state = _Step(training, data, objective, None, None, "pow2", "pow2", True)
    fwd = training.forward(state.forward_data, seq_id=state.seq_ids[0]).result()
    _, _, linear = state.compute(fwd)
    training.skip_seq(state.seq_ids[1]).result()
    return linear, state.param_field


def main() -> None:
    plain_obj = demo_objective()
    diag_obj = jr.compose(
        plain_obj.base,
        plain_obj.regularizers,
        track_grad_norms=True,
        grad_conflicts=True,
        term_grads=True,
    )
    with (
        start(state_dir="/tmp/jaxreg-bench-states") as server,
        jr.remote.ServiceClient(server.url) as client,
    ):
        batches = _batches(client.create_model())
        tokens = [sum(len(d.tokens) for d in b) for b in batches]
        plain_m, diag_m, step_plain, step_diag = (client.create_model() for _ in range(4))
        requests = [_linearised(plain_m, b, diag_obj) for b in batches]

        def fb_plain(i):
            r = plain_m.forward_backward(requests[i][0]).result()
            return r["timing"]["compute_s"]

        def fb_diag(i):
            r = diag_m.forward_backward(requests[i][0], param_diagnostics=requests[i][1]).result()
            return r["timing"]["compute_s"]

        def merged(field):
            """3 terms (entropy and confidence as one weighted row): padded to 4 rows."""
            w, rows = field["loss_weights"], field["term_weights"]
            return {
                "term_names": [*field["term_names"][:2], "entropy+confidence"],
                "loss_weights": [*w[:2], 1.0],
                "term_weights": [
                    np.concatenate([t[:2], (w[2] * t[2] + w[3] * t[3])[None]]) for t in rows
                ],
            }

        three = [merged(f) for _, f in requests]
        diag3_m = client.create_model()

        def fb_diag3(i):
            r = diag3_m.forward_backward(requests[i][0], param_diagnostics=three[i]).result()
            return r["timing"]["compute_s"]

        def custom_plain(i):
            jr.remote.forward_backward_custom(step_plain, batches[i], plain_obj).result()

        last: list[jr.remote.ParamDiagnostics] = []

        def custom_diag(i):
            r = jr.remote.forward_backward_custom(
                step_diag, batches[i], diag_obj, param_diagnostics=True
            ).result()
            last[:] = [r.param_diagnostics]

        variants = {
            "fb plain": fb_plain,
            "fb diag": fb_diag,
            "fb diag3": fb_diag3,
            "custom plain": custom_plain,
            "custom diag": custom_diag,
        }
        wall: dict[str, list[float]] = {k: [] for k in variants}
        compute: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(len(batches)):  # warm up: compile every shape
            for fn in variants.values():
                fn(i)
        for r in range(ROUNDS):
            for name, fn in variants.items():
                i = r % len(batches)
                t0 = time.perf_counter()
                c = fn(i)
                wall[name].append(time.perf_counter() - t0)
                if c is not None:
                    compute[name].append(c)
        med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
        cmed = {k: statistics.median(v) * 1e3 for k, v in compute.items() if v}
        traces = server.engine.trace_counts()

    rows = [
        [
            "forward_backward request, wall",
            f"{med['fb plain']:.1f}",
            f"{med['fb diag']:.1f}",
            f"{med['fb diag'] / med['fb plain']:.2f}x",
        ],
        [
            "forward_backward, service compute_s",
            f"{cmed['fb plain']:.1f}",
            f"{cmed['fb diag']:.1f}",
            f"{cmed['fb diag'] / cmed['fb plain']:.2f}x",
        ],
        [
            "forward_backward, service compute_s, 3 terms (padded to 4)",
            f"{cmed['fb plain']:.1f}",
            f"{cmed['fb diag3']:.1f}",
            f"{cmed['fb diag3'] / cmed['fb plain']:.2f}x",
        ],
        [
            "forward_backward_custom step, wall",
            f"{med['custom plain']:.1f}",
            f"{med['custom diag']:.1f}",
            f"{med['custom diag'] / med['custom plain']:.2f}x",
        ],
    ]
    print(
        f"demo sizes: {BATCH}+{REPLAY} datums, {min(tokens)}-{max(tokens)} tokens per batch, "
        f"[T, 32] targets, {len(plain_obj.names)} terms (padded to 4); {ROUNDS} rounds, medians"
    )
    print(table(rows, ["what", "plain ms", "with diagnostics ms", "ratio"]))
    d = last[0]
    print(
        "last step, parameter space: "
        + ", ".join(f"|g_{n}| {v:.3g}" for n, v in d.grad_norms.items())
        + f"; cos(nll, kl) {d.cosine('nll', 'kl'):+.3f}"
    )
    print(
        "compiled programs: forward_backward "
        f"{traces.get('forward_backward', 0)}, with diagnostics "
        f"{traces.get('forward_backward_param_diagnostics', 0)}"
    )


if __name__ == "__main__":
    main()
