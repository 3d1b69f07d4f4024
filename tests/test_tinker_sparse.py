"""The SDK's sparse (CSR) ``TensorData`` is accepted wherever dense is (issue 20).

``TensorData.from_torch_sparse`` encodes a mostly-zero 2-D tensor as CSR (values,
row pointers, column indices; unlisted entries 0); ``[T, K]`` targets and weights
sent that way give the same loss and logprobs as the same tensors sent dense.
"""

from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker.proto.tinker_public_pb2")

from jaxreg._src.remote.wire import WireError, decode_tensor, densify_csr  # noqa: E402
from jaxreg.service import start, tasks  # noqa: E402

types = tinker.types
KEY = "tml-jaxreg-sparse"


def _csr(a: np.ndarray, dtype: str) -> types.TensorData:
    """``a`` in the SDK's CSR encoding (what ``from_torch_sparse`` builds, without torch)."""
    rows, cols = np.nonzero(a)
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=a.shape[0]))])
    return types.TensorData(
        data=a[rows, cols].tolist(), dtype=dtype, shape=list(a.shape),
        sparse_crow_indices=crow.tolist(), sparse_col_indices=cols.tolist(),
    )  # fmt: skip


def _targets(k=3, seed=0):
    e = tasks.make_examples("I", 1, seed=seed, min_digits=2, max_digits=3)[0]
    t = len(e.tokens)
    rng = np.random.default_rng(seed)
    targets = np.zeros((t, k), np.int64)
    targets[:, 0] = e.targets
    targets[rng.random((t, k)) < 0.3] = rng.integers(1, 20)  # a few extra targets
    weights = np.zeros((t, k), np.float32)
    weights[:, 0] = 1.0
    weights[targets[:, 1] > 0, 1] = 0.5
    return e.tokens.tolist(), targets, weights


def test_sparse_targets_match_dense_through_the_sdk(tmp_path):
    srv = start(state_dir=tmp_path, api_key=KEY)
    service = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
    try:
        training = service.create_lora_training_client(base_model="jaxreg-base", rank=2).result()
        tokens, targets, weights = _targets()
        dense = types.Datum(
            model_input=types.ModelInput.from_ints(tokens),
            loss_fn_inputs={"target_tokens": targets, "weights": weights},
        )
        sparse = types.Datum(
            model_input=types.ModelInput.from_ints(tokens),
            loss_fn_inputs={
                "target_tokens": _csr(targets, "int64"),
                "weights": _csr(weights, "float32"),
            },
        )
        assert sparse.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
        a = training.forward([dense], "cross_entropy").result(timeout=120)
        b = training.forward([sparse], "cross_entropy").result(timeout=120)
        assert b.metrics["loss:sum"] == a.metrics["loss:sum"]
        lp_a = np.asarray(a.loss_fn_outputs[0]["logprobs"].to_numpy())
        lp_b = np.asarray(b.loss_fn_outputs[0]["logprobs"].to_numpy())
        assert lp_a.shape == targets.shape
        np.testing.assert_array_equal(lp_b, lp_a)
        # The loss is the weighted sum of those logprobs (float64 reference).
        ref = -np.sum(weights.astype(np.float64) * lp_a.astype(np.float64))
        np.testing.assert_allclose(a.metrics["loss:sum"], ref, rtol=1e-5)
    finally:
        service.close("success").result(timeout=30)
        srv.stop()


def test_json_csr_matches_dense_and_bad_csr_is_refused():
    rng = np.random.default_rng(1)
    a = np.where(rng.random((5, 4)) < 0.3, rng.normal(size=(5, 4)), 0.0).astype(np.float32)
    a[2] = 0.0  # an empty row
    c = _csr(a, "float32")
    td = {
        "data": list(c.data), "dtype": "float32", "shape": c.shape,
        "sparse_crow_indices": c.sparse_crow_indices, "sparse_col_indices": c.sparse_col_indices,
    }  # fmt: skip
    np.testing.assert_array_equal(decode_tensor(td, "w"), a)
    ok = (np.array([1.0]), np.array([0, 1, 1]), np.array([0]))
    with pytest.raises(WireError, match="2-D"):
        densify_csr(*ok, [2], "w")
    with pytest.raises(WireError, match="row pointers"):
        densify_csr(ok[0], np.array([0, 2, 1]), ok[2], [2, 2], "w")
    with pytest.raises(WireError, match=r"outside \[0, 2\)"):
        densify_csr(ok[0], ok[1], np.array([2]), [2, 2], "w")
    with pytest.raises(WireError, match="increase within a row"):
        densify_csr(np.ones(2), np.array([0, 2, 2]), np.array([1, 1]), [2, 2], "w")
