"""Parameter penalties on flax.nnx state: non-Param Variables are left out, with a warning.

Before the fix, ``l2(nnx.state(model))`` of a ``Linear(4, 2) + BatchNorm(2)`` model was
5.835: BatchNorm's running variance (ones) was penalised beside the parameters (3.835).
"""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from jaxreg._src.terms.pytrees import non_param_paths, params_only

nnx = pytest.importorskip("flax.nnx")

Warned = jr.regularizers.NonParamStateWarning


class LinearBN(nnx.Module):
    def __init__(self, rngs, dropout=False):
        self.linear = nnx.Linear(4, 2, rngs=rngs)
        self.bn = nnx.BatchNorm(2, rngs=rngs)
        if dropout:
            self.drop = nnx.Dropout(0.1, rngs=rngs)  # RngState: a key and a counter

    def __call__(self, x):
        return self.bn(self.linear(x))


def np_leaves(tree, only_params):
    """The tree's arrays in float64, optionally of nnx.Param Variables only."""
    is_var = lambda v: isinstance(v, nnx.Variable)
    out = []
    for v in jax.tree.leaves(tree, is_leaf=is_var):
        if only_params and not isinstance(v, nnx.Param):
            continue
        out.append(np.asarray(v[...] if is_var(v) else v, np.float64))
    return out


def test_batchnorm_statistics_are_not_penalised():
    """The issue's figure: 3.835 (parameters), not 5.835 (parameters + running var)."""
    model = LinearBN(nnx.Rngs(0))
    state = nnx.state(model)
    everything = sum(np.sum(a**2) for a in np_leaves(state, only_params=False))
    params_only_ref = sum(np.sum(a**2) for a in np_leaves(state, only_params=True))
    assert round(everything, 3) == 5.835 and round(params_only_ref, 3) == 3.835
    with pytest.warns(Warned) as record:
        value, metrics = jr.regularizers.l2(state, None)
    assert float(value) == pytest.approx(params_only_ref, rel=1e-6)
    assert float(metrics["norm"]) == pytest.approx(np.sqrt(params_only_ref), rel=1e-6)
    message = str(record[0].message)
    assert message.startswith("l2: left out 2 flax.nnx Variable(s) that are not nnx.Param: ")
    assert "['bn']['mean'] (BatchStat), ['bn']['var'] (BatchStat)" in message
    assert "nnx.split(model, nnx.Param, ...)" in message
    assert "nnx.state(model, nnx.Param)" in message


def test_params_alone_do_not_warn_and_give_the_same_value():
    model = LinearBN(nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, params, _ = nnx.split(model, nnx.Param, ...)
        split_value = float(jr.regularizers.l2(params, None)[0])
        state_value = float(jr.regularizers.l2(nnx.state(model, nnx.Param), None)[0])
    assert split_value == state_value == pytest.approx(3.835274, abs=1e-6)


def test_l1_and_elastic_net_leave_statistics_out_too():
    model = LinearBN(nnx.Rngs(1))
    ref = np_leaves(nnx.state(model), only_params=True)
    l1_ref = sum(np.sum(np.abs(a)) for a in ref)
    l2_ref = sum(np.sum(a**2) for a in ref)
    with pytest.warns(Warned, match=r"^l1: left out 2 "):
        l1, l1_metrics = jr.regularizers.l1(nnx.state(model), None)
    with pytest.warns(Warned, match=r"^elastic_net: left out 2 "):
        en, en_metrics = jr.regularizers.elastic_net(l1_ratio=0.25)(nnx.state(model), None)
    assert float(l1) == pytest.approx(l1_ref, rel=1e-6)
    assert float(l1_metrics["max_abs"]) == pytest.approx(max(np.max(np.abs(a)) for a in ref))
    assert float(en_metrics["l1"]) == pytest.approx(l1_ref, rel=1e-6)
    assert float(en) == pytest.approx(0.25 * l1_ref + 0.75 * l2_ref, rel=1e-6)


@pytest.mark.parametrize("center_params_only", [False, True])
def test_l2_sp_center_is_filtered_alike(center_params_only):
    """L2-SP: the centre may be the whole state or the parameters; the statistics of
    neither count (they differ here: the fine-tuned model's are not the initial ones)."""
    model = LinearBN(nnx.Rngs(0))
    start = nnx.state(model, nnx.Param) if center_params_only else nnx.state(model)
    start = jax.tree.map(jnp.copy, start)
    model.linear.kernel[...] = model.linear.kernel[...] + 0.5
    model.bn.var[...] = jnp.full(2, 7.0)
    model.bn(model.linear(jnp.ones((3, 4))))  # updates the running mean too
    moved, initial = np_leaves(nnx.state(model), True), np_leaves(start, True)
    ref = sum(np.sum((a - b) ** 2) for a, b in zip(moved, initial, strict=True))
    assert ref == pytest.approx(8 * 0.25, rel=1e-6)  # only the kernel moved, by 0.5
    with pytest.warns(Warned):
        value = jr.regularizers.l2(center=start)(nnx.state(model), None)[0]
    assert float(value) == pytest.approx(ref, rel=1e-6)


def test_rng_state_no_longer_breaks_the_penalty():
    """A Dropout's RNG key (a key array) made l2 and l1 of nnx.state(model) raise."""
    model = LinearBN(nnx.Rngs(0), dropout=True)
    state = nnx.state(model)
    paths = dict(non_param_paths(state))
    assert paths["['drop']['rngs']['key']"] == "RngKey"
    assert paths["['drop']['rngs']['count']"] == "RngCount"
    with pytest.warns(Warned, match=r"left out 4 .*\['drop'\]\['rngs'\]\['key'\] \(RngKey\)"):
        value = jr.regularizers.l1(center=0.5)({"model": state}, None)[0]
    ref = sum(np.sum(np.abs(a - 0.5)) for a in np_leaves(state, only_params=True))
    assert float(value) == pytest.approx(ref, rel=1e-6)


def test_pruned_state_has_the_structure_of_the_params():
    model = LinearBN(nnx.Rngs(0), dropout=True)
    with pytest.warns(Warned):
        pruned = params_only("l2", nnx.state(model))
    assert jax.tree.structure(pruned) == jax.tree.structure(nnx.state(model, nnx.Param))
    # Elsewhere than in dicts and States a left-out Variable becomes an empty subtree.
    with pytest.warns(Warned, match=r"^t: left out 1 .*\[0\] \(BatchStat\)"):
        mixed = params_only("t", [model.bn.var, jnp.ones(3), model.bn.scale])
    assert mixed[0] is None and mixed[2] is model.bn.scale
    np.testing.assert_array_equal(mixed[1], np.ones(3))
    with pytest.warns(Warned):
        assert params_only("t", nnx.state(model.bn, nnx.BatchStat)) == nnx.State({})


def test_plain_pytrees_pass_unchanged():
    tree = {"w": jnp.ones((2, 2)), "b": [jnp.zeros(2)], "n": None}
    assert params_only("l2", tree) is tree
    assert non_param_paths(tree) == []


def test_in_compose_grad_of_the_statistics_is_zero_and_warns_once_per_compile():
    """x = the whole state: the value and gradient are those of the parameters only;
    the warning comes at trace time, not on every call."""
    model = LinearBN(nnx.Rngs(0))
    state = nnx.state(model)
    objective = jr.compose(
        None,
        [jr.Term("decay", jr.regularizers.l2, weight=0.5, on="params")],
        forward=lambda p, b: p,
        track_grad_norms=True,
    )
    with pytest.warns(Warned, match="^l2: left out 2"):
        out = objective(state, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective(state, None)  # the compiled program: no second warning
    assert objective.trace_count == 1
    assert float(out.terms["decay"].value) == pytest.approx(3.835274, abs=1e-6)
    np.testing.assert_allclose(out.grad["bn"]["var"][...], np.zeros(2))
    np.testing.assert_allclose(out.grad["bn"]["mean"][...], np.zeros(2))
    kernel = np.asarray(model.linear.kernel[...], np.float64)
    np.testing.assert_allclose(out.grad["linear"]["kernel"][...], 0.5 * 2 * kernel, rtol=1e-6)
    grad_norm_ref = np.sqrt(sum(np.sum((2 * a) ** 2) for a in np_leaves(state, True)))
    assert float(out.terms["decay"].grad_norm) == pytest.approx(grad_norm_ref, rel=1e-6)


def test_jaxreg_does_not_import_flax():
    code = (
        "import sys, jax.numpy as jnp, jaxreg as jr\n"
        "v = jr.regularizers.l2({'w': jnp.ones(3)}, None)[0]\n"
        "assert float(v) == 3.0 and 'flax' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
