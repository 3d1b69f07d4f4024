"""The synthetic task corpus and character tokenizer of the reference model.

Every example is one line ``<task><digits>><answer>\\n`` over a 32-token vocabulary:

* ``C`` copy:    ``C3821>3821``
* ``R`` reverse: ``R3821>1283``
* ``S`` sort:    ``S3821>1238``
* ``I`` increment every digit (mod 10): ``I3821>4932``

The base checkpoint is trained on copy and reverse; the demo fine-tunes it on
increment and measures how much of the base skills (held-out copy and reverse) it keeps. Everything
is generated from a seed; nothing is downloaded.

Example:
  >>> from jaxreg.service import tasks
  >>> ex = tasks.make_example("R", "3821")
  >>> tasks.decode(ex.tokens), tasks.decode(ex.targets)    # input, next tokens
  ('<bos>R3821>1283', 'R3821>1283\\n')
  >>> ex.answer_mask.tolist()                              # the answer and its newline
  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  >>> [tasks.decode(e.targets) for e in tasks.make_examples("I", 2, seed=0, max_digits=4)]
  ['I4333>5444\\n', 'I897>908\\n']
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS = 0, 1
_SYMBOLS = ["<pad>", "<bos>", "\n", ">", *"0123456789", "C", "R", "S", "I"]
VOCAB: tuple[str, ...] = tuple(_SYMBOLS + [f"<unused{i}>" for i in range(32 - len(_SYMBOLS))])
VOCAB_SIZE = len(VOCAB)
_INDEX = {s: i for i, s in enumerate(VOCAB)}
TASKS = {"C": "copy", "R": "reverse", "S": "sort", "I": "increment"}


def encode(text: str) -> list[int]:
    """Character-level token ids of ``text`` (no BOS)."""
    try:
        return [_INDEX[c] for c in text]
    except KeyError as e:
        raise ValueError(f"encode: character {e.args[0]!r} is not in the vocabulary") from None


def decode(tokens) -> str:
    """The text of a token sequence (special tokens spelled ``<bos>`` etc.)."""
    return "".join(VOCAB[int(t)] for t in tokens)


def answer(task: str, digits: str) -> str:
    """The correct answer of ``task`` on ``digits``."""
    if task == "C":
        return digits
    if task == "R":
        return digits[::-1]
    if task == "S":
        return "".join(sorted(digits))
    if task == "I":
        return "".join(str((int(d) + 1) % 10) for d in digits)
    raise ValueError(f"answer: unknown task {task!r}; expected one of {sorted(TASKS)}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example, already shifted for next-token training.

    Attributes:
      tokens: model input ``[BOS, c_0, ..., c_{n-2}]``.
      targets: next tokens ``[c_0, ..., c_{n-1}]`` (same length as ``tokens``).
      answer_mask: 1.0 on the target positions of the answer and its newline.
    """

    tokens: np.ndarray
    targets: np.ndarray
    answer_mask: np.ndarray


def make_example(task: str, digits: str) -> Example:
    """Tokenises one example of ``task`` on the digit string ``digits``."""
    text = f"{task}{digits}>{answer(task, digits)}\n"
    ids = np.asarray(encode(text), np.int32)
    tokens = np.concatenate([[BOS], ids[:-1]]).astype(np.int32)
    mask = np.zeros(len(ids), np.float32)
    mask[len(task) + len(digits) + 1 :] = 1.0  # the answer and the final newline
    return Example(tokens, ids, mask)


def make_examples(
    task: str, n: int, *, seed: int, min_digits: int = 3, max_digits: int = 8
) -> list[Example]:
    """``n`` random examples of ``task`` with ``min_digits..max_digits`` digits."""
    rng = np.random.default_rng([seed, ord(task)])
    lengths = rng.integers(min_digits, max_digits + 1, size=n)
    return [make_example(task, "".join(map(str, rng.integers(0, 10, k)))) for k in lengths]


def pad_examples(examples: list[Example], length: int | None = None):
    """Stacks examples into padded ``(tokens, targets, loss_mask, answer_mask)`` arrays."""
    t = length or max(len(e.tokens) for e in examples)
    b = len(examples)
    tokens = np.full((b, t), PAD, np.int32)
    targets = np.full((b, t), PAD, np.int32)
    mask = np.zeros((b, t), np.float32)
    answer_mask = np.zeros((b, t), np.float32)
    for i, e in enumerate(examples):
        n = len(e.tokens)
        tokens[i, :n], targets[i, :n], mask[i, :n], answer_mask[i, :n] = (
            e.tokens,
            e.targets,
            1.0,
            e.answer_mask,
        )
    return tokens, targets, mask, answer_mask
