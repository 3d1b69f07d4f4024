"""The SDK's ``RestClient`` checkpoint calls against ``jaxreg serve`` (issue 20)."""

from __future__ import annotations

import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker.proto.tinker_public_pb2")

from jaxreg.service import start  # noqa: E402

KEY = "tml-jaxreg-rest"


def test_training_runs_and_checkpoints_via_rest_client(tmp_path):
    srv = start(state_dir=tmp_path, api_key=KEY)
    service = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
    try:
        training = service.create_lora_training_client(base_model="jaxreg-base", rank=2).result()
        run = training.model_id
        rest = service.create_rest_client()
        got = rest.get_training_run(run).result(timeout=30)
        assert got.training_run_id == run and got.is_lora and got.lora_rank == 2
        assert got.last_checkpoint is None
        p1 = training.save_state("one").result(timeout=60).path
        p2 = training.save_state("two").result(timeout=60).path
        sp = training.save_weights_for_sampler("s").result(timeout=60).path
        listed = rest.list_checkpoints(run).result(timeout=30).checkpoints
        assert sorted(c.tinker_path for c in listed) == sorted([p1, p2, sp])
        kinds = {c.checkpoint_id: c.checkpoint_type for c in listed}
        assert kinds == {"weights/one": "training", "weights/two": "training",
                         "sampler_weights/s": "sampler"}  # fmt: skip
        runs = rest.list_training_runs().result(timeout=30)
        assert run in [r.training_run_id for r in runs.training_runs]
        assert runs.cursor.total_count == len(runs.training_runs)
        assert rest.get_training_run(run).result(timeout=30).last_checkpoint is not None
        rest.delete_checkpoint(run, "weights/one").result(timeout=30)
        left = {c.checkpoint_id for c in rest.list_checkpoints(run).result(timeout=30).checkpoints}
        assert left == {"weights/two", "sampler_weights/s"}
        with pytest.raises(tinker.NotFoundError):
            rest.delete_checkpoint(run, "weights/one").result(timeout=30)
        with pytest.raises(tinker.NotFoundError):
            rest.get_training_run("no-such-run").result(timeout=30)
        # The deleted checkpoint is gone for loading too; the kept one still loads.
        training.load_state(p2).result(timeout=60)
    finally:
        service.close("success").result(timeout=30)
        srv.stop()
