"""A plain tinker SDK training loop, run against ``jaxreg serve`` (a local Tinker).

Run: ``python examples/tinker_sdk_loop.py`` (starts the reference service on a free
port and points the SDK at it). The loop is what a Tinker user writes: supervised steps with
``cross_entropy``, then RL steps (sample, reward, ``ppo``), and one step whose loss is
composed with jaxreg (cross-entropy + an entropy bonus) through
``jr.remote.forward_backward_custom``. On Tinker, only the service address, the key
and the base model (with its tokenizer) differ.
"""

import os

import numpy as np
import tinker
from tinker import types

import jaxreg as jr
from jaxreg.service import start, tasks

BASE_MODEL = "jaxreg-base"


def supervised_datum(example) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(example.tokens.tolist()),
        loss_fn_inputs={
            "target_tokens": example.targets.astype(np.int64),
            "weights": example.answer_mask,
        },
    )


def rl_data(sampler, digits: str, num_samples: int, seed: int):
    """Samples answers to ``I<digits>>``, rewards the right ones, returns PPO datums."""
    prompt = [tasks.BOS, *tasks.encode(f"I{digits}>")]
    params = types.SamplingParams(max_tokens=len(digits) + 1, stop="\n", seed=seed)
    result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples, params).result()
    rewards = np.array(
        [tasks.decode(s.tokens).strip() == tasks.answer("I", digits) for s in result.sequences],
        np.float32,
    )
    advantages = rewards - rewards.mean()
    data = []
    for seq, adv in zip(result.sequences, advantages, strict=True):
        full = prompt + list(seq.tokens)
        n = len(prompt) - 1
        mask = np.r_[np.zeros(n), np.ones(len(seq.tokens))].astype(np.float32)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={
                    "target_tokens": np.asarray(full[1:], np.int64),
                    "logprobs": np.r_[np.zeros(n), seq.logprobs].astype(np.float32),
                    "advantages": (mask * adv).astype(np.float32),
                },
            )
        )
    return data, float(rewards.mean())


def train(service: tinker.ServiceClient, sl_steps: int = 20, rl_steps: int = 5) -> None:
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=8).result()
    adam = types.AdamParams(learning_rate=3e-3)
    examples = tasks.make_examples("I", 64 * sl_steps, seed=0, max_digits=5)
    for step in range(sl_steps):
        batch = [supervised_datum(e) for e in examples[64 * step : 64 * (step + 1)]]
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(adam)  # submitted before waiting: pipelined
        loss = fwd_bwd.result().metrics["loss:sum"]
        optim.result()
        tokens = sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in batch)
        print(f"sl step {step:3d}  nll/token {loss / tokens:.3f}")

    # One step with a loss composed by jaxreg: the SDK client is passed as is.
    batch = [supervised_datum(e) for e in examples[:64]]
    custom = jr.remote.forward_backward_custom(
        training, batch, base=jr.losses.cross_entropy,
        regularizers=[jr.Term("entropy", jr.regularizers.entropy, weight=0.01)],  # a bonus
    )  # fmt: skip
    training.optim_step(adam).result()
    metrics = custom.result().metrics
    print(f"custom step  loss_total {metrics['loss_total']:.2f}  entropy "
          f"{metrics['regularizers/entropy/value']:.2f}")  # fmt: skip

    rng = np.random.default_rng(0)
    for step in range(rl_steps):
        sampler = training.save_weights_and_get_sampling_client().result()
        digits = "".join(map(str, rng.integers(0, 10, 3)))
        data, reward = rl_data(sampler, digits, num_samples=16, seed=step)
        fwd_bwd = training.forward_backward(
            data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
        )
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        loss = fwd_bwd.result().metrics["loss:sum"]
        print(f"rl step {step:3d}  reward {reward:.2f}  ppo loss {loss:.3f}")

    path = training.save_state("final").result().path
    print(f"saved {path}")


def main(sl_steps: int = 20, rl_steps: int = 5) -> None:
    key = os.environ.get("TINKER_API_KEY", "tml-local")
    with start(state_dir="/tmp/jaxreg-tinker-example", api_key=key) as server:
        service = tinker.ServiceClient(base_url=server.url, api_key=key)
        try:
            train(service, sl_steps, rl_steps)
        finally:
            service.close("success").result()


if __name__ == "__main__":
    main()
