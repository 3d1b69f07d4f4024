"""Composed regularizers in a tinker-cookbook SFT loop, per-term metrics in its logger.

Run: ``python examples/cookbook_jaxreg_terms.py LOG_DIR`` (``-h`` for the options; set
``HF_HUB_OFFLINE=1``). It starts ``jaxreg serve`` in-process on 127.0.0.1 and trains the
base model (``jaxreg/base``, renderer ``jaxreg/digits``) on a task it has not seen
(``--task I``: increment every digit; it knows copy and reverse), with the tinker SDK as
the client and the cookbook's own parts, unmodified:

* the data: a JSONL file of conversations read by the cookbook's
  ``FromConversationFileBuilder`` (renderer, ``conversation_to_datum``, batching);
* the logger: ``ml_log.setup_logging`` (``LOG_DIR/metrics.jsonl`` and a console table);
* the learning-rate schedule (``compute_schedule_lr_multiplier``), ``compute_mean_nll``
  and the final ``checkpoint_utils.save_checkpoint`` (recorded in
  ``LOG_DIR/checkpoints.jsonl``; the service keeps its state in ``LOG_DIR/service-state``).

Where the cookbook's ``supervised.train`` calls ``forward_backward(data,
"cross_entropy")``, this loop calls ``jr.remote.forward_backward_custom`` with::

    L = -sum_{b,t} w_bt log p(y_bt)                           "nll" (the base loss)
        + kl_weight * mean_{answer t} KL(p_t || p_ref,t)      "kl"
        - entropy_weight * mean_{all t} H(p_t)                "entropy" (a bonus)

(the cookbook's weights ``w`` sum to 1 per conversation; the KL is averaged over the
answer tokens, the entropy over all positions). The base vocabulary has 32 tokens, so
every position's targets are the whole vocabulary (``[T, 32]`` targets): KL and entropy
are exact, not sampled estimates, and the gradient norms are taken in logit space
(``grad_space="logits"``). The reference model is the base model: a second LoRA client
that is never trained (LoRA starts at zero) gives ``ref_logprobs`` for each batch.

Every step logs, through the cookbook's logger, the service's and jaxreg's metrics:
``loss_total``, ``base_loss/value``, and for each regularizer
``regularizers/<name>/{value,weight,contribution,grad_norm,grad_norm_weighted}`` (its
custom metrics under ``.../custom/...``), ``total_grad_norm``, plus the cookbook's
``train_mean_nll``, ``learning_rate`` and ``progress``. With the defaults (30 steps of
16 conversations) ``train_mean_nll`` falls from about 6.8 to 1.9 while the KL to the base
model rises from 0 (step 0: the policy is the reference) to about 5.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np
import tinker
from tinker_cookbook import checkpoint_utils
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised.common import compute_mean_nll
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.utils import ml_log
from tinker_cookbook.utils.lr_scheduling import compute_schedule_lr_multiplier

import jaxreg as jr
import jaxreg.cookbook  # registers the jaxreg/digits renderer; installs the tokenizer
from jaxreg.service import start, tasks

VOCAB = np.arange(tasks.VOCAB_SIZE, dtype=np.int64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log_dir", help="the cookbook log directory (metrics.jsonl, checkpoints)")
    p.add_argument(
        "--task",
        default="I",
        choices=sorted(tasks.TASKS),
        help="I (increment) is new to the base model",
    )
    p.add_argument("--steps", type=int, default=30, help="training steps (batches)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument(
        "--lr-schedule",
        default="linear",
        choices=["linear", "cosine", "constant"],
        help="the cookbook's LR schedule",
    )
    p.add_argument("--kl-weight", type=float, default=0.5, help="weight of KL to the base model")
    p.add_argument("--entropy-weight", type=float, default=0.05, help="entropy bonus weight")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_conversations(path: pathlib.Path, task: str, n: int, seed: int) -> None:
    """``n`` conversations of ``task``, one JSON object a line (the cookbook's format)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for k in rng.integers(3, 7, size=n):
            digits = "".join(map(str, rng.integers(0, 10, k)))
            messages = [
                {"role": "user", "content": task + digits},
                {"role": "assistant", "content": tasks.answer(task, digits)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def full_vocabulary(datum: tinker.Datum) -> tinker.Datum:
    """The cookbook's datum with every vocabulary token a target at every position.

    ``target_tokens`` becomes ``[T, K]`` (``K`` = the vocabulary), ``weights`` the
    cookbook's weight on the true token's column, and ``answer`` marks the positions with
    a positive weight (where the KL applies).
    """
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy().astype(np.int64)
    w = datum.loss_fn_inputs["weights"].to_numpy().astype(np.float32)
    t = len(targets)
    weights = np.zeros((t, len(VOCAB)), np.float32)
    weights[np.arange(t), targets] = w
    inputs = {
        "target_tokens": np.broadcast_to(VOCAB, (t, len(VOCAB))).copy(),
        "weights": weights,
        "answer": (w > 0).astype(np.float32),
    }
    return tinker.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={k: tinker.TensorData.from_numpy(v) for k, v in inputs.items()},
    )


def with_reference(
    reference: tinker.TrainingClient, data: list[tinker.Datum]
) -> list[tinker.Datum]:
    """Adds ``ref_logprobs``: the reference model's ``[T, K]`` logprobs of each datum."""
    targets = [
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]},
        )
        for d in data
    ]
    outputs = reference.forward(targets, "cross_entropy").result().loss_fn_outputs
    return [
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={**d.loss_fn_inputs, "ref_logprobs": o["logprobs"]},
        )
        for d, o in zip(data, outputs, strict=True)
    ]


def objective(kl_weight: float, entropy_weight: float) -> jr.Objective:
    """Cross-entropy (the service's, a sum) + KL to the reference + an entropy bonus."""
    return jr.compose(
        jr.Term("nll", jr.losses.cross_entropy),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs", where="answer"), weight=kl_weight),
            jr.Term("entropy", jr.regularizers.entropy, weight=entropy_weight),
        ],
        track_grad_norms=True,
        grad_space="logits",  # full-vocabulary targets: norms of what moves the model
    )


def train(
    args: argparse.Namespace, url: str, api_key: str
) -> list[tuple[list, jr.remote.CustomResult]]:
    """The loop; returns each step's data and ``CustomResult`` (for inspection)."""
    log_dir = pathlib.Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    data_file = log_dir / "conversations.jsonl"
    write_conversations(data_file, args.task, args.steps * args.batch_size, args.seed)
    dataset, _ = FromConversationFileBuilder(
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=jaxreg.cookbook.MODEL_NAME,
            renderer_name=jaxreg.cookbook.RENDERER_NAME,
            max_length=64,
            batch_size=args.batch_size,
            train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE,
        ),
        file_path=str(data_file),
    )()
    ml_logger = ml_log.setup_logging(str(log_dir), config=vars(args))
    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    model = jaxreg.cookbook.MODEL_NAME
    training = service.create_lora_training_client(base_model=model, rank=args.lora_rank).result()
    reference = service.create_lora_training_client(base_model=model, rank=args.lora_rank).result()
    loss = objective(args.kl_weight, args.entropy_weight)
    history = []
    steps = min(args.steps, len(dataset))
    for step in range(steps):
        batch = dataset.get_batch(step)
        data = with_reference(reference, [full_vocabulary(d) for d in batch])
        lr = args.learning_rate * compute_schedule_lr_multiplier(args.lr_schedule, step, steps)
        future = jr.remote.forward_backward_custom(training, data, loss)
        optim = training.optim_step(tinker.AdamParams(learning_rate=lr))  # after the backward
        result = future.result()
        optim.result()
        # The cookbook's mean NLL, on the true tokens' logprobs of the same forward.
        true_lp = [
            tinker.TensorData.from_numpy(
                lp[np.arange(len(lp)), d.loss_fn_inputs["target_tokens"].to_numpy()]
            )
            for lp, d in zip(result.logprobs, batch, strict=True)
        ]
        metrics = {
            "step": step,
            "progress": (step + 1) / steps,
            "learning_rate": lr,
            "train_mean_nll": compute_mean_nll(
                true_lp, [d.loss_fn_inputs["weights"] for d in batch]
            ),
            **result.metrics,  # service metrics, loss:sum and out.flat()
        }
        ml_logger.log_metrics(metrics, step=step)
        history.append((data, result))
        m = result.metrics
        print(
            f"step {step:3d}  loss {m['loss_total']:8.4f}  nll {metrics['train_mean_nll']:.4f}  "
            f"kl {m['regularizers/kl/value']:.4f}  entropy {-m['regularizers/entropy/value']:.4f}  "
            f"|g| nll {m['base_loss/grad_norm']:.3g} kl {m['regularizers/kl/grad_norm']:.3g} "
            f"entropy {m['regularizers/entropy/grad_norm']:.3g}",
            flush=True,
        )
    paths = checkpoint_utils.save_checkpoint(
        training, "final", str(log_dir), {"step": steps, "final": True}
    )
    print(f"saved {paths['state_path']}; metrics in {log_dir / 'metrics.jsonl'}")
    ml_logger.close()
    if not all(math.isfinite(r.metrics["loss_total"]) for _, r in history):
        raise RuntimeError("non-finite loss")
    return history


def main(argv=None):
    """Parses ``argv``, runs the service and the loop; returns the loop's history."""
    args = parse_args(argv)
    key = "tml-local"
    srv = start(api_key=key, state_dir=pathlib.Path(args.log_dir) / "service-state")
    try:
        return train(args, srv.url, key)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
