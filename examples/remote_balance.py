"""``balance_grad_norms`` on the reference service's model, through the remote adapter.

Run: ``python examples/remote_balance.py``. Starts the reference service, fine-tunes
its model on the increment task with cross-entropy + KL to the base model + an entropy
bonus, all exact over the vocabulary (``[T, K]`` multi-target logprobs), and lets
``jr.weighting.balance_grad_norms`` set the regularizers' weights every step so that KL
carries 30% and entropy 5% of the summed weighted gradient norms, whatever the losses'
scales. The norms are taken in logit space (``grad_space="logits"``): with respect to the
logprobs, the component along the probabilities, which cannot move the model, would
dominate them. The objective compiles once: the weights are traced arguments.
"""

import numpy as np

import jaxreg as jr
from jaxreg.service import start, tasks


def all_targets(example) -> jr.remote.Datum:
    """Every token of the vocabulary is a target: logprobs are the full distribution."""
    t, k = len(example.tokens), tasks.VOCAB_SIZE
    targets = np.broadcast_to(np.arange(k, dtype=np.int64), (t, k)).copy()
    weights = np.zeros((t, k), np.float32)
    weights[np.arange(t), example.targets] = example.answer_mask
    return jr.remote.Datum(example.tokens, {"target_tokens": targets, "weights": weights})


def main(steps: int = 30):
    with (
        start(state_dir="/tmp/jaxreg-example-states") as server,
        jr.remote.ServiceClient(server.url) as client,
    ):
        reference = client.create_model()
        training = client.create_model()
        data = [all_targets(e) for e in tasks.make_examples("I", 256, seed=0)]
        targets_only = [
            jr.remote.Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]})
            for d in data
        ]
        ref = reference.forward(targets_only).result()["loss_fn_outputs"]
        data = [
            d.replace_inputs(ref_logprobs=r["logprobs"]) for d, r in zip(data, ref, strict=True)
        ]
        objective = jr.compose(
            jr.Term("nll", jr.losses.cross_entropy(reduction="token_mean")),
            [
                jr.Term("kl", jr.regularizers.kl("ref_logprobs"), weight=0.1),
                jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
            ],
            track_grad_norms=True,
            grad_space="logits",  # full-vocabulary targets: norms of what moves the model
        )
        weighting = jr.weighting.balance_grad_norms({"kl": 0.3, "entropy": 0.05}, decay=0.5)
        rng = np.random.default_rng(0)
        weights, state = None, None
        for step in range(steps):
            batch = [data[i] for i in rng.choice(len(data), 16, replace=False)]
            result = jr.remote.forward_backward_custom(
                training, batch, objective, weights=weights
            ).result()
            training.optim_step({"learning_rate": 1e-3}).result()
            out = result.output
            # At step 0 the policy is the reference model: the KL term sits at its minimum
            # with a zero gradient (in logit space), and no weight can give it a share.
            # Balance from the first step on which it pulls.
            if step > 0:
                state = weighting.init(out) if state is None else state
                weights, state = weighting.update(out, state)
            if step % 5 == 0 or step == steps - 1:
                d = out.to_dict()
                norms = {n: r["grad_norm_weighted"] for n, r in d["regularizers"].items()}
                total = d["base_loss"]["grad_norm"] + sum(norms.values())
                print(
                    f"step {step}: nll {d['base_loss']['value']:.3f}  "
                    + "  ".join(
                        f"{n}: weight {d['regularizers'][n]['weight']:.3g} share "
                        f"{norms[n] / total:.0%}"
                        for n in norms
                    )
                )
        print(f"objective compiled {objective.trace_count} time(s) for {steps} steps")


if __name__ == "__main__":
    main()
