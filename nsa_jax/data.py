"""Training data that needs no download: byte-level text and synthetic long-context tasks.

* ``text``: the Python standard library's own source files (tens of MB of
  ``.py`` files of the running interpreter), byte-level (vocabulary 256), split
  into train and validation *by file* with a hash of the file's path.
* ``passkey``: passkey retrieval (the long-context probe of the NSA paper,
  §4.3 and Fig. 5): a number hidden at a chosen depth of repeated filler text,
  asked for at the end. Only the answer digits carry loss.
* ``mqar``: multi-query associative recall: many ``key=value`` pairs, then
  several keys asked again; only the recalled values carry loss.

A batch is ``{"inputs", "targets", "weights"}``, each ``[batch, seq_len]``:
``targets`` are ``inputs`` shifted by one and ``weights`` say which targets
count in the loss. The :class:`Loader` draws batch ``k`` from an RNG seeded by
``(seed, k)``, so its whole state is the count ``k``: saving that count in the
checkpoint makes a resumed run read exactly the batches it would have read.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256  # bytes
TASKS = ("text", "passkey", "mqar")

FILLER = (b"The grass is green. The sky is blue. The sun is yellow. "
          b"Here we go. There and back again. ")
PASSKEY_DIGITS = 5
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
MQAR_KEY_LETTERS = 4
MQAR_VALUE_DIGITS = 4
MQAR_QUERIES = 8


@dataclasses.dataclass(frozen=True)
class Example:
  """One sequence of ``seq_len + 1`` tokens and the loss weight of each token."""
  tokens: np.ndarray   # uint8 [seq_len + 1]
  weights: np.ndarray  # float32 [seq_len + 1]; weight of predicting tokens[i]


# ----------------------------------------------------------------------------
# Text: the standard library's source files.


def stdlib_files() -> list[pathlib.Path]:
  """The ``.py`` files of this interpreter's standard library, sorted, without site-packages."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(p for p in root.rglob("*.py")
                if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def is_validation_file(path: pathlib.Path, val_percent: int) -> bool:
  """A file belongs to validation when a hash of its path falls below `val_percent`."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return zlib.crc32(str(path.relative_to(root)).encode()) % 100 < val_percent


@functools.lru_cache(maxsize=4)
def stdlib_corpus(val_percent: int = 5) -> dict[str, np.ndarray]:
  """{"train": uint8 array, "val": uint8 array}: the files of each split, concatenated."""
  if not 0 < val_percent < 100:
    raise ValueError(f"val_percent={val_percent} must be in 1..99")
  parts = {"train": [], "val": []}
  for path in stdlib_files():
    split = "val" if is_validation_file(path, val_percent) else "train"
    parts[split].append(path.read_bytes() + b"\n\n")
  if not parts["train"] or not parts["val"]:
    raise RuntimeError(f"no standard-library sources found under "
                       f"{sysconfig.get_paths()['stdlib']}")
  return {k: np.frombuffer(b"".join(v), np.uint8) for k, v in parts.items()}


def text_example(rng: np.random.Generator, stream: np.ndarray, length: int) -> Example:
  """A random window of `length` bytes of `stream`; every token counts."""
  if len(stream) <= length:
    raise ValueError(f"text stream of {len(stream)} bytes is too short for "
                     f"sequences of {length} tokens")
  start = int(rng.integers(0, len(stream) - length))
  return Example(stream[start:start + length].copy(), np.ones(length, np.float32))


# ----------------------------------------------------------------------------
# Synthetic long-context tasks.


def _concat(pieces: list[tuple[bytes, bool]]) -> Example:
  """Joins byte strings; those flagged True carry loss."""
  tokens = np.frombuffer(b"".join(p for p, _ in pieces), np.uint8).copy()
  weights = np.concatenate([np.full(len(p), float(w), np.float32) for p, w in pieces])
  return Example(tokens, weights)


def passkey_example(rng: np.random.Generator, length: int,
                    depth: float | None = None) -> Example:
  """Passkey retrieval: filler, the key at `depth` (0 = start, 1 = end of the filler), the question.

  The sequence ends with ``"... The pass key is 12345"``: only those digits carry loss.
  `depth` None draws it uniformly.
  """
  key = str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS))).encode()
  needle = PASSKEY_NEEDLE.format(key=key.decode()).encode()
  question = PASSKEY_QUESTION.encode()
  filler_len = length - len(needle) - len(question) - len(key)
  if filler_len < 0:
    raise ValueError(f"passkey sequences need at least "
                     f"{length - filler_len} tokens, got seq_len + 1 = {length}")
  depth = float(rng.uniform()) if depth is None else depth
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  cut = round(depth * filler_len)
  offset = int(rng.integers(len(FILLER)))  # so the needle does not sit at a fixed phase
  filler = (FILLER * (filler_len // len(FILLER) + 2))[offset:offset + filler_len]
  return _concat([(filler[:cut], False), (needle, False), (filler[cut:], False),
                  (question, False), (key, True)])


def mqar_example(rng: np.random.Generator, length: int) -> Example:
  """Multi-query associative recall: ``abcd=1234`` pairs, then ``?`` and some keys asked again.

  Each asked key is followed by its value; only those value digits carry loss.
  """
  pair_len = MQAR_KEY_LETTERS + 1 + MQAR_VALUE_DIGITS + 1
  num_pairs = (length - 1 - MQAR_QUERIES * pair_len) // pair_len
  if num_pairs < MQAR_QUERIES:
    raise ValueError(f"mqar sequences need at least {min_length('mqar')} "
                     f"tokens, got seq_len + 1 = {length}")
  codes = rng.choice(26 ** MQAR_KEY_LETTERS, size=num_pairs, replace=False)
  keys = [bytes(97 + (c // 26 ** i) % 26 for i in range(MQAR_KEY_LETTERS)) for c in codes]
  values = [str(v).zfill(MQAR_VALUE_DIGITS).encode()
            for v in rng.integers(0, 10 ** MQAR_VALUE_DIGITS, size=num_pairs)]
  pad = length - 1 - (num_pairs + MQAR_QUERIES) * pair_len
  pieces = [(b" " * pad, False)]
  pieces += [(k + b"=" + v + b" ", False) for k, v in zip(keys, values)]
  pieces.append((b"?", False))
  for i in rng.choice(num_pairs, size=MQAR_QUERIES, replace=False):
    pieces += [(keys[i] + b"=", False), (values[i], True), (b" ", False)]
  return _concat(pieces)


# ----------------------------------------------------------------------------
# Mixtures and the resumable loader.


def parse_mixture(spec: str, seq_len: int | None = None) -> dict[str, float]:
  """``"text:0.9,passkey:0.1"`` -> {"text": 0.9, "passkey": 0.1} (weights normalized).

  With `seq_len`, also checks that every task fits in sequences of that length.
  """
  mixture = {}
  for item in spec.split(","):
    name, _, weight = item.strip().partition(":")
    if name not in TASKS:
      raise ValueError(f"unknown task {name!r} in mixture={spec!r}; tasks are {TASKS}")
    try:
      mixture[name] = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"weight {weight!r} of {name!r} in mixture={spec!r} "
                       f"is not a number") from None
    if mixture[name] <= 0:
      raise ValueError(f"weight of {name!r} in mixture={spec!r} must be > 0")
    if seq_len is not None and seq_len + 1 < min_length(name):
      raise ValueError(f"task {name!r} needs seq_len >= {min_length(name) - 1}, "
                       f"got seq_len={seq_len}")
  total = sum(mixture.values())
  return {k: v / total for k, v in mixture.items()}


def min_length(task: str) -> int:
  """The fewest tokens (seq_len + 1) an example of `task` can have."""
  if task == "passkey":
    needle = PASSKEY_NEEDLE.format(key="0" * PASSKEY_DIGITS)
    return len(needle) + len(PASSKEY_QUESTION) + PASSKEY_DIGITS
  if task == "mqar":
    return 2 * MQAR_QUERIES * (MQAR_KEY_LETTERS + MQAR_VALUE_DIGITS + 2) + 1
  return 2


def make_example(task: str, rng: np.random.Generator, length: int, split: str,
                 val_percent: int = 5) -> Example:
  """One example of `task` with `length` tokens (inputs and the last target)."""
  if task == "text":
    return text_example(rng, stdlib_corpus(val_percent)[split], length)
  if task == "passkey":
    return passkey_example(rng, length)
  if task == "mqar":
    return mqar_example(rng, length)
  raise ValueError(f"task={task!r} must be one of {TASKS}")


def collate(examples: list[Example]) -> dict[str, np.ndarray]:
  tokens = np.stack([e.tokens for e in examples]).astype(np.int32)
  weights = np.stack([e.weights for e in examples])
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights[:, 1:]}


_SPLIT_IDS = {"train": 0, "val": 1}


class Loader:
  """Endless, deterministic batches of a task mixture; resumable from `state_dict()`.

  Batch ``k`` depends only on ``(seed, split, k)``: each row draws its task
  from `mixture`, then its example.
  """

  def __init__(self, mixture: str, *, seq_len: int, batch_size: int, seed: int = 0,
               split: str = "train", val_percent: int = 5):
    if split not in _SPLIT_IDS:
      raise ValueError(f"split={split!r} must be 'train' or 'val'")
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    self.mixture = parse_mixture(mixture, seq_len)
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.split, self.val_percent = split, val_percent
    self.position = 0

  def batch_at(self, position: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], position])
    names = list(self.mixture)
    tasks = rng.choice(len(names), size=self.batch_size, p=list(self.mixture.values()))
    return collate([make_example(names[t], rng, self.seq_len + 1, self.split,
                                 self.val_percent) for t in tasks])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.position)
    self.position += 1
    return batch

  def state_dict(self) -> dict[str, int]:
    return {"position": self.position, "seed": self.seed}

  def load_state_dict(self, state: dict[str, int]) -> None:
    if state["seed"] != self.seed:
      raise ValueError(f"checkpointed loader seed={state['seed']} differs from "
                       f"this run's seed={self.seed}")
    self.position = int(state["position"])


def validation_batches(task: str, *, seq_len: int, batch_size: int, num_batches: int,
                       seed: int = 0, val_percent: int = 5) -> list[dict[str, np.ndarray]]:
  """A fixed list of validation batches of one task (text from the validation files)."""
  loader = Loader(task, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  split="val", val_percent=val_percent)
  return [next(loader) for _ in range(num_batches)]
