"""Training data that needs no download: byte-level text and synthetic long-context tasks.

Tasks: ``text`` (the Python standard library's source files, split into train and validation
by a hash of the path), ``passkey`` (a number hidden in filler text, paper §4.3) and ``mqar``
(multi-query associative recall); only answers carry loss in the last two. A batch is
``{"inputs", "targets", "weights"}`` ``[batch, seq_len]``, plus ``"segment_ids"`` for rows
packed with whole documents aligned to ``select_block`` (:func:`pack_documents`;
docs/semantics.md#packed-rows, docs/api.md#training); otherwise one random window per row.
The :class:`Loader` draws batch ``k`` from an RNG seeded by ``(seed, k)``, so its state is
the count ``k``.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import sysconfig
import zlib
from typing import Iterable, Sequence

import numpy as np

VOCAB_SIZE = 256  # bytes
TASKS = ("text", "passkey", "mqar")
PAD = 0           # token after a document's end, up to the next aligned start (weight 0)

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
  """A document: its tokens and the loss weight of predicting each from the ones before it.

  ``weights[i]`` weighs the prediction of ``tokens[i]``; ``weights[0]`` is never
  used (nothing predicts a document's first token).
  """
  tokens: np.ndarray   # [n] integer tokens (uint8 bytes here)
  weights: np.ndarray  # float32 [n]


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
def stdlib_documents(val_percent: int = 5) -> dict[str, list[bytes]]:
  """{"train": [...], "val": [...]}: the bytes of every file of each split, in path order."""
  if not 0 < val_percent < 100:
    raise ValueError(f"val_percent={val_percent} must be in 1..99")
  docs = {"train": [], "val": []}
  for path in stdlib_files():
    docs["val" if is_validation_file(path, val_percent) else "train"].append(path.read_bytes())
  if not docs["train"] or not docs["val"]:
    raise RuntimeError(f"no standard-library sources found under "
                       f"{sysconfig.get_paths()['stdlib']}")
  return docs


@functools.lru_cache(maxsize=4)
def stdlib_corpus(val_percent: int = 5) -> dict[str, np.ndarray]:
  """{"train": uint8 array, "val": uint8 array}: the files of each split, each + b"\\n\\n", concatenated."""
  return {k: np.frombuffer(b"".join(d + b"\n\n" for d in v), np.uint8)
          for k, v in stdlib_documents(val_percent).items()}


def text_example(rng: np.random.Generator, stream: np.ndarray, length: int) -> Example:
  """A random window of `length` bytes of `stream`; every token counts."""
  if len(stream) <= length:
    raise ValueError(f"text stream of {len(stream)} bytes is too short for "
                     f"sequences of {length} tokens")
  start = int(rng.integers(0, len(stream) - length))
  return Example(stream[start:start + length].copy(), np.ones(length, np.float32))


@dataclasses.dataclass(frozen=True)
class TextPieces:
  """The files of one split cut into pieces of at most `seq_len` bytes, shortest first.

  Piece ``i`` is ``stream[starts[i]:starts[i] + lengths[i]]``; a file of ``L``
  bytes gives the pieces at offsets ``0, seq_len, 2 seq_len, ..`` of it.
  """
  stream: np.ndarray    # uint8: the split's files concatenated
  starts: np.ndarray    # int64 [P]
  lengths: np.ndarray   # int64 [P], ascending
  cumulative: np.ndarray  # int64 [P]: running sum of `lengths` (length-weighted draws)

  def draw(self, rng: np.random.Generator, max_length: int) -> Example | None:
    """A piece of at most `max_length` bytes, drawn with probability proportional to its
    length among those; None if none is that short."""
    fitting = int(np.searchsorted(self.lengths, max_length, side="right"))
    if fitting == 0:
      return None
    i = int(np.searchsorted(self.cumulative, rng.integers(self.cumulative[fitting - 1]),
                            side="right"))
    start, length = self.starts[i], self.lengths[i]
    return Example(self.stream[start:start + length], np.ones(length, np.float32))


@functools.lru_cache(maxsize=4)
def _files_stream(split: str, val_percent: int) -> tuple[np.ndarray, np.ndarray]:
  """(the files of `split` concatenated, the size of each), shared by every row length."""
  docs = stdlib_documents(val_percent)[split]
  return np.frombuffer(b"".join(docs), np.uint8), np.array([len(d) for d in docs], np.int64)


@functools.lru_cache(maxsize=16)
def text_pieces(split: str, seq_len: int, val_percent: int = 5) -> TextPieces:
  """The files of `split` cut into pieces for rows of `seq_len` tokens (empty files give none)."""
  stream, sizes = _files_stream(split, val_percent)
  starts, lengths = [], []
  for file_start, size in zip(np.cumsum(sizes) - sizes, sizes):
    offsets = np.arange(0, size, seq_len)
    starts.append(file_start + offsets)
    lengths.append(np.minimum(seq_len, size - offsets))
  starts, lengths = np.concatenate(starts), np.concatenate(lengths)
  order = np.argsort(lengths, kind="stable")
  return TextPieces(stream, starts[order], lengths[order], np.cumsum(lengths[order]))


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
                     f"{length - filler_len} tokens, got length={length}")
  depth = float(rng.uniform()) if depth is None else depth
  cut = needle_span(length, depth)[0]
  offset = int(rng.integers(len(FILLER)))  # so the needle does not sit at a fixed phase
  filler = (FILLER * (filler_len // len(FILLER) + 2))[offset:offset + filler_len]
  return _concat([(filler[:cut], False), (needle, False), (filler[cut:], False),
                  (question, False), (key, True)])


def needle_span(length: int, depth: float) -> tuple[int, int]:
  """Where `passkey_example(rng, length, depth)` puts its needle sentence: [start, stop)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  start = round(depth * (length - min_length("passkey")))
  return start, start + len(PASSKEY_NEEDLE.format(key="0" * PASSKEY_DIGITS))


def mqar_example(rng: np.random.Generator, length: int) -> Example:
  """Multi-query associative recall: ``abcd=1234`` pairs, then ``?`` and some keys asked again.

  Each asked key is followed by its value; only those value digits carry loss.
  The example ends with the last asked value.
  """
  pair_len = MQAR_KEY_LETTERS + 1 + MQAR_VALUE_DIGITS + 1
  num_pairs = (length - MQAR_QUERIES * pair_len) // pair_len
  if num_pairs < MQAR_QUERIES:
    raise ValueError(f"mqar sequences need at least {min_length('mqar')} "
                     f"tokens, got length={length}")
  codes = rng.choice(26 ** MQAR_KEY_LETTERS, size=num_pairs, replace=False)
  keys = [bytes(97 + (c // 26 ** i) % 26 for i in range(MQAR_KEY_LETTERS)) for c in codes]
  values = [str(v).zfill(MQAR_VALUE_DIGITS).encode()
            for v in rng.integers(0, 10 ** MQAR_VALUE_DIGITS, size=num_pairs)]
  pad = length - (num_pairs + MQAR_QUERIES) * pair_len   # "?" takes the last query's space
  pieces = [(b" " * pad, False)]
  pieces += [(k + b"=" + v + b" ", False) for k, v in zip(keys, values)]
  pieces.append((b"?", False))
  for n, i in enumerate(rng.choice(num_pairs, size=MQAR_QUERIES, replace=False)):
    pieces += [(b" " if n else b"", False), (keys[i] + b"=", False), (values[i], True)]
  return _concat(pieces)


# ----------------------------------------------------------------------------
# Packing documents into rows (docs/semantics.md#packed-rows).


def check_alignment(align: int, seq_len: int) -> None:
  """Raises a ValueError unless a row of `seq_len` tokens can hold documents aligned to `align`."""
  if not isinstance(align, int) or not 1 <= align <= seq_len:
    raise ValueError(f"align={align!r} must be an int in 1..seq_len={seq_len}: documents start "
                     f"at multiples of align, and a row of seq_len={seq_len} tokens must "
                     f"hold at least one")


def aligned(length: int, align: int) -> int:
  """`length` rounded up to a multiple of `align`: the room a document takes in a row."""
  return -(-length // align) * align


def as_example(document) -> Example:
  """An Example of a byte string or token array (every token counts); Examples pass through."""
  if isinstance(document, Example):
    return document
  tokens = (np.frombuffer(document, np.uint8) if isinstance(document, (bytes, bytearray))
            else np.asarray(document))
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"a document must be bytes or a 1-d integer array, got "
                     f"{tokens.dtype} of shape {tokens.shape}")
  return Example(tokens, np.ones(len(tokens), np.float32))


def pieces(document: Example, seq_len: int) -> list[Example]:
  """`document` cut into pieces of at most `seq_len` tokens (each a document of its own)."""
  return [Example(document.tokens[i:i + seq_len], document.weights[i:i + seq_len])
          for i in range(0, len(document.tokens), seq_len)]


def pack_row(documents: Sequence[Example], seq_len: int, align: int) -> dict[str, np.ndarray]:
  """One row of `seq_len` positions holding `documents` in order (packed rows).

  Document ``i`` starts at the first multiple of `align` after document
  ``i - 1`` and has segment id ``i``; `PAD` tokens of its id and weight 0 fill
  the room up to the next document (or the row's end). Its last token's target
  has weight 0: no loss crosses a boundary.
  """
  row = {"inputs": np.full(seq_len, PAD, np.int32), "targets": np.full(seq_len, PAD, np.int32),
         "weights": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32)}
  start = 0
  for i, doc in enumerate(documents):
    n = len(doc.tokens)
    if n == 0 or start + n > seq_len:
      raise ValueError(f"document {i} of {n} tokens does not fit at position {start} of a "
                       f"row of seq_len={seq_len} (align={align})")
    row["inputs"][start:start + n] = doc.tokens
    row["targets"][start:start + n - 1] = doc.tokens[1:]
    row["weights"][start:start + n - 1] = doc.weights[1:]
    row["segment_ids"][start:] = i
    start += aligned(n, align)
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def pack_documents(documents: Iterable, *, seq_len: int, align: int) -> dict[str, np.ndarray]:
  """Packs your own documents into rows: {"inputs", "targets", "weights", "segment_ids"} [R, seq_len].

  `documents` are byte strings, 1-d integer token arrays (every token counts)
  or `Example`s (their own loss weights). Each document, or each `seq_len`-token
  piece of a longer one, goes into the first row with room for it (first fit,
  in the given order), starting at a multiple of `align` (use the model's
  `select_block`). Empty documents are skipped.
  """
  check_alignment(align, seq_len)
  rows: list[list[Example]] = []
  ends = np.zeros(0, np.int64)   # where the next document of each row would start
  for document in documents:
    for piece in pieces(as_example(document), seq_len):
      n = len(piece.tokens)
      room = np.flatnonzero(ends + n <= seq_len)
      if len(room):
        r = int(room[0])
      else:
        r = len(rows)
        rows.append([])
        ends = np.append(ends, 0)
      rows[r].append(piece)
      ends[r] += aligned(n, align)
  if not rows:
    raise ValueError("pack_documents got no non-empty document")
  return stack_rows([pack_row(docs, seq_len, align) for docs in rows])


# ----------------------------------------------------------------------------
# Mixtures and the resumable loader.


def parse_mixture(spec: str, seq_len: int | None = None) -> dict[str, float]:
  """``"text:0.9,passkey:0.1"`` -> {"text": 0.9, "passkey": 0.1} (weights normalized).

  With `seq_len`, also checks that every task fits in rows of that length.
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
    if seq_len is not None and seq_len < min_length(name):
      raise ValueError(f"task {name!r} needs seq_len >= {min_length(name)}, "
                       f"got seq_len={seq_len}")
  total = sum(mixture.values())
  return {k: v / total for k, v in mixture.items()}


def min_length(task: str) -> int:
  """The fewest tokens an example of `task` can have."""
  if task == "passkey":
    needle = PASSKEY_NEEDLE.format(key="0" * PASSKEY_DIGITS)
    return len(needle) + len(PASSKEY_QUESTION) + PASSKEY_DIGITS
  if task == "mqar":
    return 2 * MQAR_QUERIES * (MQAR_KEY_LETTERS + MQAR_VALUE_DIGITS + 2)
  return 2


def make_example(task: str, rng: np.random.Generator, length: int, split: str,
                 val_percent: int = 5) -> Example:
  """One example of `task` with `length` tokens (a random text window for "text")."""
  if task == "text":
    return text_example(rng, stdlib_corpus(val_percent)[split], length)
  if task == "passkey":
    return passkey_example(rng, length)
  if task == "mqar":
    return mqar_example(rng, length)
  raise ValueError(f"task={task!r} must be one of {TASKS}")


def collate(examples: list[Example]) -> dict[str, np.ndarray]:
  """Rows of `seq_len + 1`-token examples -> a batch of `seq_len`, one document per row
  (no `segment_ids`: the model then runs each row as one sequence)."""
  tokens = np.stack([e.tokens for e in examples]).astype(np.int32)
  weights = np.stack([e.weights for e in examples])
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights[:, 1:]}


_SPLIT_IDS = {"train": 0, "val": 1}


class Loader:
  """Endless, deterministic batches of a task mixture; resumable from `state_dict()`.

  Batch ``k`` depends only on ``(seed, split, k)``: each row draws its task
  from `mixture`, then its contents.

  Args:
    align: None for random windows (one segment per row); an int ``A`` for
      packed rows: documents start at multiples of ``A`` (module docstring).
      Text rows are filled with pieces of the split's files, each drawn with
      probability proportional to its length among those that fit the room
      left, until none fits.
    pack_tasks: (packed rows only) a passkey or mqar row holds several
      examples, each of a length drawn uniformly between the task's minimum and
      the room left, instead of one the length of the row; each is a document
      of its own, which the model runs alone (it reads segment_ids).
    text_weight: the loss weight of every text token (the answer tokens of
      passkey and mqar weigh 1). A passkey row has 5 answer tokens and a text
      row hundreds: below 1 it keeps text from drowning the tasks' gradient.
      A task's validation loss (weighted mean over its tokens) is the same
      whatever the weight.
  """

  def __init__(self, mixture: str, *, seq_len: int, batch_size: int, seed: int = 0,
               split: str = "train", val_percent: int = 5, align: int | None = None,
               pack_tasks: bool = False, text_weight: float = 1.0):
    if split not in _SPLIT_IDS:
      raise ValueError(f"split={split!r} must be 'train' or 'val'")
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if align is not None:
      check_alignment(align, seq_len)
    elif pack_tasks:
      raise ValueError("pack_tasks=True needs packed rows (align=None was given)")
    if not text_weight > 0:
      raise ValueError(f"text_weight={text_weight} must be > 0")
    self.mixture = parse_mixture(mixture, seq_len)
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.split, self.val_percent = split, val_percent
    self.align, self.pack_tasks, self.text_weight = align, pack_tasks, text_weight
    self.position = 0

  def batch_at(self, position: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], position])
    names = list(self.mixture)
    tasks = [names[t] for t in rng.choice(len(names), size=self.batch_size,
                                          p=list(self.mixture.values()))]
    if self.align is None:
      return collate([self.weighted(task, make_example(task, rng, self.seq_len + 1, self.split,
                                                       self.val_percent)) for task in tasks])
    return stack_rows([pack_row([self.weighted(task, doc) for doc in self.row_documents(task, rng)],
                                self.seq_len, self.align) for task in tasks])

  def weighted(self, task: str, example: Example) -> Example:
    if task != "text" or self.text_weight == 1.0:
      return example
    return Example(example.tokens, example.weights * np.float32(self.text_weight))

  def row_documents(self, task: str, rng: np.random.Generator) -> list[Example]:
    """The documents of one packed row of `task`."""
    docs, room = [], self.seq_len
    if task == "text":
      pool = text_pieces(self.split, self.seq_len, self.val_percent)
      while room > 0 and (doc := pool.draw(rng, room)) is not None:
        docs.append(doc)
        room -= aligned(len(doc.tokens), self.align)
      return docs
    if not self.pack_tasks:
      return [make_example(task, rng, self.seq_len, self.split, self.val_percent)]
    while room >= min_length(task):
      docs.append(make_example(task, rng, int(rng.integers(min_length(task), room + 1)),
                               self.split, self.val_percent))
      room -= aligned(len(docs[-1].tokens), self.align)
    return docs

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
                       seed: int = 0, val_percent: int = 5, align: int | None = None,
                       pack_tasks: bool = False, text_weight: float = 1.0
                       ) -> list[dict[str, np.ndarray]]:
  """A fixed list of validation batches of one task (text from the validation files)."""
  loader = Loader(task, seq_len=seq_len, batch_size=batch_size, seed=seed, split="val",
                  val_percent=val_percent, align=align, pack_tasks=pack_tasks,
                  text_weight=text_weight)
  return [next(loader) for _ in range(num_batches)]
