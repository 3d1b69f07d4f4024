"""The ``param_grad_diagnostics`` extension against independent per-term backward passes.

Every reference gradient here is computed one term at a time, with ``jax.grad`` of the
term's loss through the service's model (the same parameters, read back from the
service), not through the linearisation or the service's batched pullback; Gramians,
norms and cosines of the references are taken in float64 NumPy.
"""

from __future__ import annotations

import asyncio

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from service_helpers import assert_trees_equal, examples, params_of

import jaxreg as jr
from jaxreg._src.demo.demo import _multi_target
from jaxreg._src.remote.custom import _pack
from jaxreg._src.remote.param_diagnostics import encode_field
from jaxreg._src.remote.wire import Datum
from jaxreg.service import checkpoint, tasks
from jaxreg.service import model as model_lib

ANTI_SCALE = 1e3  # the "anti" term is -1000 x the NLL: an exact conflict at another scale
NAMES = ("nll", "kl", "entropy", "anti")
WEIGHTS = {"kl": 0.3, "entropy": 0.01, "anti": 1e-4}


def _nll():
    return jr.losses.cross_entropy(reduction="token_mean")


def _terms():
    nll = _nll()
    return jr.Term("nll", nll), [
        jr.Term("kl", jr.regularizers.kl("ref_logprobs", where="kl_mask"), weight=0.3),
        jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
        jr.Term("anti", lambda x, b: -ANTI_SCALE * nll(x, b)[0], weight=1e-4),
    ]


@pytest.fixture(scope="module")
def objective():
    base, regs = _terms()
    return jr.compose(base, regs, term_grads=True)


@pytest.fixture(scope="module")
def plain_objective():
    base, regs = _terms()
    return jr.compose(base, regs)


@pytest.fixture(scope="module")
def data(client):
    """Full-vocabulary [T, 32] datums as in the demo: 2 to learn, 2 replayed (KL only)."""
    learn = [_multi_target(e, learn=True) for e in examples("I", 2, seed=3)]
    keep = [_multi_target(e, learn=False) for e in examples("C", 2, seed=4)]
    ds = learn + keep
    ref = client.create_model().forward(
        [Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in ds]
    )
    rng = np.random.default_rng(0)
    out = []
    for d, o in zip(ds, ref.result()["loss_fn_outputs"], strict=True):
        noisy = o["logprobs"] + rng.normal(0, 0.5, o["logprobs"].shape)
        out.append(d.replace_inputs(ref_logprobs=noisy.astype(np.float32)))
    return out


def _flat64(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _reference(server, params, objective, data, logprobs):
    """Each term's parameter gradient, one ``jax.grad`` per term, as float64 rows."""
    cfg = server.engine.config
    x, batch = _pack(data, logprobs, "pow2", "pow2")
    b, t = x.shape[:2]
    tokens = np.zeros((b, t), np.int32)
    targets = np.zeros(x.shape, np.int32)
    for i, d in enumerate(data):
        n = len(d.tokens)
        tokens[i, :n] = d.tokens
        targets[i, :n] = d.loss_fn_inputs["target_tokens"]
    rows = []
    for term in objective.terms:

        def loss(p, term=term):
            lp = model_lib.token_logprobs(cfg, p, jnp.asarray(tokens), jnp.asarray(targets))
            return term.evaluate(lp, batch)[0]

        rows.append(_flat64(jax.grad(loss)(params)))
    return np.stack(rows)


def _grad_acc(training, server, name):
    training.save_state(name).result()
    tree, meta = checkpoint.load_tree(server.engine.state_dir / f"{name}.npz")
    return tree["grad_acc"], meta


def test_norms_gramian_and_update_match_per_term_backward(server, client, objective, data):
    training = client.create_model()
    params, _ = params_of(training, server, "pd-before")
    result = jr.remote.forward_backward_custom(
        training, data, objective, param_diagnostics=True
    ).result()
    diag = result.param_diagnostics
    assert diag is not None and diag.space == "parameters"
    assert diag.term_names == NAMES

    J = _reference(server, params, objective, data, result.logprobs)
    gram = J @ J.T
    norms = np.sqrt(np.diagonal(gram))
    cos = gram / np.outer(norms, norms)
    w = np.asarray([1.0, *WEIGHTS.values()], np.float32).astype(np.float64)

    np.testing.assert_allclose(diag.weights, w)
    got = np.asarray([diag.grad_norms[n] for n in NAMES])
    np.testing.assert_allclose(got, norms, rtol=2e-4)
    scale = np.outer(norms, norms)  # entries relative to |g_i| |g_j|
    np.testing.assert_allclose(diag.gram / scale, gram / scale, atol=2e-4)
    np.testing.assert_allclose(diag.cosines, cos, atol=2e-4)
    # The hard pair: an exact conflict, three orders of magnitude apart.
    assert diag.cosine("nll", "anti") == pytest.approx(-1.0, abs=1e-5)
    assert diag.grad_norms["anti"] / diag.grad_norms["nll"] == pytest.approx(ANTI_SCALE, 1e-4)
    # Different tokens (NLL on learned datums, KL on replayed ones): orthogonal in
    # logprob space, not in parameter space.
    assert abs(diag.cosine("nll", "kl")) > 1e-3
    np.testing.assert_allclose(diag.total_grad_norm, np.linalg.norm(w @ J), rtol=2e-4)

    # Metrics, labelled as parameter space.
    m = result.metrics
    assert m["param/kl/grad_norm"] == diag.grad_norms["kl"]
    assert m["param/cos/nll/kl"] == pytest.approx(cos[0, 1], abs=2e-4)
    assert m["param/total_grad_norm"] == diag.total_grad_norm
    assert "param/cos/kl/nll" not in m and "param/cos/nll/nll" not in m

    # The service accumulated exactly sum_i w_i g_i.
    acc, meta = _grad_acc(training, server, "pd-after")
    assert meta["n_accumulated"] == 1
    np.testing.assert_allclose(_flat64(acc), w @ J, rtol=1e-3, atol=1e-5 * np.abs(w @ J).max())


def test_demo_sized_batch_kl_at_its_minimum(server, client, objective):
    """The demo's shape ([32, 32, 32] padded) with the KL reference = the base model.

    At its minimum the exact KL's gradient in logprob space is ``p / N`` (not zero), but
    it cannot move the model: in parameter space it is zero. A ``vmap`` of the pullback
    over the term cotangents returned wrong rows at this shape on XLA:CPU (16.5 here).
    """
    learn = [_multi_target(e, learn=True) for e in tasks.make_examples("I", 16, seed=5)]
    keep = [_multi_target(e, learn=False) for e in tasks.make_examples("R", 8, seed=6)]
    ds = learn + keep
    base_lp = client.create_model().forward(
        [Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in ds]
    )
    ds = [
        d.replace_inputs(ref_logprobs=o["logprobs"])
        for d, o in zip(ds, base_lp.result()["loss_fn_outputs"], strict=True)
    ]
    training = client.create_model()
    params, _ = params_of(training, server, "pd-demo")
    result = jr.remote.forward_backward_custom(
        training, ds, objective, param_diagnostics=True
    ).result()
    diag = result.param_diagnostics
    assert np.asarray(result.output.term_grads).shape[1:] == (32, 32, 32)
    J = _reference(server, params, objective, ds, result.logprobs)
    norms = np.linalg.norm(J, axis=1)
    got = np.asarray([diag.grad_norms[n] for n in NAMES])
    np.testing.assert_allclose(got, norms, rtol=2e-4, atol=1e-4 * norms.max())
    assert np.linalg.norm(np.asarray(result.output.term_grads[1])) > 1e-2  # logprob space
    assert diag.grad_norms["kl"] < 1e-5 * diag.grad_norms["nll"]  # parameter space


def test_update_equals_plain_path(server, client, objective, plain_objective, data):
    adam = {"learning_rate": 1e-2, "eps": 1.0}  # eps >> |g|: the update is smooth in g
    plain, diag = client.create_model(), client.create_model()
    r0 = jr.remote.forward_backward_custom(plain, data, plain_objective).result()
    r1 = jr.remote.forward_backward_custom(diag, data, objective, param_diagnostics=True).result()
    assert r1.metrics["loss:sum"] == pytest.approx(r0.metrics["loss:sum"], rel=1e-6)
    assert r1.metrics["surrogate_loss:sum"] == pytest.approx(r0.metrics["surrogate_loss:sum"])
    a0, _ = _grad_acc(plain, server, "pd-plain")
    a1, _ = _grad_acc(diag, server, "pd-diag")
    f0, f1 = _flat64(a0), _flat64(a1)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=2e-5 * np.abs(f0).max())
    n0 = plain.optim_step(adam).result()["metrics"]["grad_norm"]
    n1 = diag.optim_step(adam).result()["metrics"]["grad_norm"]
    assert n1 == pytest.approx(n0, rel=1e-5)
    assert r1.param_diagnostics.total_grad_norm == pytest.approx(n0, rel=2e-4)
    p0, _ = params_of(plain, server, "pd-plain-1")
    p1, _ = params_of(diag, server, "pd-diag-1")
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)


def _hand_field(data, t_rows, loss_weights):
    """A request field from explicit per-datum term weights ``[n, T, K]``."""
    names = [f"t{i}" for i in range(len(loss_weights))]
    return {"term_names": names, "loss_weights": list(loss_weights), "term_weights": t_rows}


def _consistent(data, n, seed):
    """Random term weights and datums whose ``weights`` are their weighted sum."""
    rng = np.random.default_rng(seed)
    lw = rng.uniform(0.1, 2.0, n).astype(np.float32)
    rows, ds = [], []
    for d in data:
        t = rng.normal(size=(n, *d.loss_fn_inputs["target_tokens"].shape)).astype(np.float32)
        total = np.tensordot(lw.astype(np.float64), t.astype(np.float64), axes=1)
        rows.append(t)
        ds.append(
            Datum(
                d.tokens,
                {
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "weights": total.astype(np.float32),
                },
            )
        )
    return ds, _hand_field(data, rows, [float(v) for v in lw])


def test_trace_count_bounded_over_term_counts(server, client, data):
    engine = server.engine
    training = client.create_model()
    key = "forward_backward_param_diagnostics"
    counts = []
    for n in (1, 2, 3, 4, 3, 4, 2):  # padded to 1, 2, 4 terms: three programs
        ds, field = _consistent(data, n, seed=n)
        training.forward_backward(ds, param_diagnostics=field).result()
        counts.append(engine.trace_counts().get(key, 0))
    assert counts[-1] - counts[0] <= 2, counts
    assert counts[3:] == [counts[3]] * 4, counts
    training.optim_step({"learning_rate": 0.0}).result()


def test_random_cotangents_match_jax_grad(server, client, data):
    """A hand-made request: g_i = grad of -sum(t_i * logprobs), one term at a time."""
    training = client.create_model()
    params, _ = params_of(training, server, "pd-hand")
    ds, field = _consistent(data, 3, seed=7)
    res = training.forward_backward(ds, param_diagnostics=field).result()["param_diagnostics"]
    cfg = server.engine.config
    rows = []
    for i in range(3):

        def loss(p, i=i):
            return sum(
                -jnp.sum(
                    jnp.asarray(field["term_weights"][k][i])
                    * model_lib.token_logprobs(
                        cfg,
                        p,
                        jnp.asarray(d.tokens[None], jnp.int32),
                        jnp.asarray(d.loss_fn_inputs["target_tokens"][None], jnp.int32),
                    )[0]
                )
                for k, d in enumerate(ds)
            )

        rows.append(_flat64(jax.grad(loss)(params)))
    J = np.stack(rows)
    gram = J @ J.T
    norms = np.sqrt(np.diagonal(gram))
    np.testing.assert_allclose(res["grad_norms"], norms, rtol=2e-4)
    scale = np.outer(norms, norms)
    np.testing.assert_allclose(np.asarray(res["gram"]) / scale, gram / scale, atol=2e-4)


def _post_body(training, data, field, seq, **changes):
    body = training._data_body("forward_backward", data, "cross_entropy", None, seq)
    body["param_diagnostics"] = encode_field(field, training.service.tensor_encoding)
    for k, v in changes.items():
        body["param_diagnostics"][k] = v
    return body


def test_bad_fields_rejected_and_change_nothing(server, client, data):
    training = client.create_model()
    ds, field = _consistent(data, 2, seed=1)
    enc = training.service.tensor_encoding

    def rows_of(arrays):
        return [jr.remote.encode_tensor(a, enc) for a in arrays]

    t = field["term_weights"]
    cases = {
        "param_diagnostics.term_names": dict(term_names=["a", "a"]),
        "param_diagnostics.loss_weights": dict(loss_weights=[1.0, "inf"]),
        "param_diagnostics.term_weights[1]": dict(
            term_weights=rows_of([t[0], t[1][:1], *t[2:]])  # one row short
        ),
        "param_diagnostics.term_weights[2]": dict(
            term_weights=rows_of([*t[:2], np.where(np.ones_like(t[2]), np.nan, t[2]), *t[3:]])
        ),
        "param_diagnostics.term_weights[0]": dict(
            term_weights=rows_of([t[0] * 1.01, *t[1:]])  # inconsistent with `weights`
        ),
        "param_diagnostics.term_weights": dict(term_weights=rows_of(t[:-1])),
        "param_diagnostics: unknown": dict(extra=1),
    }
    seq = training.reserve_seq_ids(1)[0]
    for field_name, change in cases.items():
        body = _post_body(training, ds, field, seq, **change)
        with pytest.raises(jr.remote.RemoteError) as e:
            client.post("forward_backward", body)
        assert e.value.status == 400
        reason = str(e.value).split("HTTP 400: ")[1]
        assert reason.startswith(field_name.split(":")[0]), reason
    # Not with forward_only (nor on forward, nor another loss: same check).
    body = _post_body(training, ds, field, seq)
    body.update(forward_only=True)
    with pytest.raises(jr.remote.RemoteError, match="only forward_backward"):
        client.post("forward_backward", body)
    # The seq_id was not used up, and nothing was accumulated: after one valid request
    # the model holds exactly what a fresh model holds after that request alone.
    valid = _post_body(training, ds, field, seq)
    rid = client.post("forward_backward", valid)["request_id"]
    assert "param_diagnostics" in client.wait("forward_backward", valid, rid)
    acc, meta = _grad_acc(training, server, "pd-bad")
    assert meta["n_accumulated"] == 1
    fresh = client.create_model()
    fresh.forward_backward(ds, param_diagnostics=field).result()
    acc1, _ = _grad_acc(fresh, server, "pd-fresh")
    assert_trees_equal(acc, acc1)


class _NoCapabilities(httpx.BaseTransport):
    """The real transport, except that ``capabilities`` answers as an older service would."""

    def __init__(self, answer: httpx.Response | None = None):
        self.inner = httpx.HTTPTransport()
        self.answer = answer
        self.endpoints: list[str] = []

    def handle_request(self, request):
        endpoint = request.url.path.rsplit("/", 1)[-1]
        self.endpoints.append(endpoint)
        if endpoint == "capabilities":
            return self.answer or httpx.Response(404, json={"detail": "Not Found"})
        return self.inner.handle_request(request)


@pytest.mark.parametrize(
    "answer", [None, httpx.Response(200, json={"extensions": ["something_else"]})]
)
def test_service_without_extension_is_a_clear_error(server, objective, data, answer):
    transport = _NoCapabilities(answer)
    with jr.remote.ServiceClient(server.url, transport=transport) as c:
        training = c.create_model()
        with pytest.raises(jr.remote.UnsupportedExtensionError, match="param_grad_diagnostics"):
            jr.remote.forward_backward_custom(training, data, objective, param_diagnostics=True)
        assert "forward" not in transport.endpoints  # nothing was sent
        # Without the flag, the same client trains as usual.
        r = jr.remote.forward_backward_custom(training, data, objective).result()
        assert r.param_diagnostics is None and not any(k.startswith("param/") for k in r.metrics)


def test_tinker_client_and_objective_errors(client, plain_objective, data):
    class FakeTinker:  # the official SDK's interface, as far as the adapter looks
        def forward(self, *a, **k): ...

        def forward_backward(self, *a, **k): ...

    base, regs = _terms()
    with pytest.raises(jr.remote.UnsupportedExtensionError, match="tinker"):
        jr.remote.forward_backward_custom(
            FakeTinker(), data, base=base, regularizers=regs, param_diagnostics=True
        )
    training = client.create_model()
    with pytest.raises(jr.TermError, match="term_grads=True"):
        jr.remote.forward_backward_custom(training, data, plain_objective, param_diagnostics=True)
    host = jr.compose(base, [*regs, jr.HostTerm("ext", lambda x, b, d: 0.0)])
    with pytest.raises(jr.TermError, match="host terms"):
        jr.remote.forward_backward_custom(training, data, host, param_diagnostics=True)


def test_base_regularizers_and_async(server, client, data):
    """``base=``/``regularizers=`` build the objective with term_grads; async works too."""
    base, regs = _terms()
    training = client.create_model()

    async def go():
        fut = await jr.remote.forward_backward_custom_async(
            training, data, base=base, regularizers=regs, param_diagnostics=True
        )
        return await fut

    r = asyncio.run(go())
    assert set(r.param_diagnostics.grad_norms) == set(NAMES)
    assert r.param_diagnostics.cosine("nll", "anti") == pytest.approx(-1.0, abs=1e-5)
    assert np.isfinite(r.param_diagnostics.gram).all()
