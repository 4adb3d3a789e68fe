"""Data: the standard-library corpus split, the synthetic tasks, the resumable loader."""
import numpy as np
import pytest

from nsa_jax import data


def test_corpus_split_by_file_is_deterministic_and_disjoint():
  files = data.stdlib_files()
  val = [f for f in files if data.is_validation_file(f, 5)]
  assert 0 < len(val) < len(files) // 5
  assert val == [f for f in data.stdlib_files() if data.is_validation_file(f, 5)]
  corpus = data.stdlib_corpus(5)
  sizes = {f: f.stat().st_size + 2 for f in files}  # each file ends with b"\n\n"
  assert len(corpus["val"]) == sum(sizes[f] for f in val)
  assert len(corpus["train"]) == sum(sizes.values()) - len(corpus["val"])
  assert len(corpus["train"]) > 10_000_000  # tens of MB of text
  probe = val[0].read_bytes()[:200]
  assert probe in corpus["val"].tobytes() and probe not in corpus["train"].tobytes()


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_example(depth):
  length = 300
  ex = data.passkey_example(np.random.default_rng(1), length, depth)
  text = bytes(ex.tokens)
  assert len(ex.tokens) == len(ex.weights) == length
  key = text[-data.PASSKEY_DIGITS:]
  assert key.isdigit() and ex.weights.sum() == data.PASSKEY_DIGITS
  assert np.all(ex.weights[-data.PASSKEY_DIGITS:] == 1)
  assert text.endswith(data.PASSKEY_QUESTION.encode() + key)
  needle = data.PASSKEY_NEEDLE.format(key=key.decode()).encode()
  filler_len = length - data.min_length("passkey")
  assert text.index(needle) == round(depth * filler_len)
  start, stop = data.needle_span(length, depth)
  assert text[start:stop] == needle


def test_passkey_too_short_names_the_length():
  n = data.min_length("passkey")
  data.passkey_example(np.random.default_rng(0), n)
  with pytest.raises(ValueError, match=f"at least {n} tokens"):
    data.passkey_example(np.random.default_rng(0), n - 1)


def test_mqar_example_recalls_the_context_values():
  length = 400
  ex = data.mqar_example(np.random.default_rng(2), length)
  text = bytes(ex.tokens).decode()
  assert len(ex.tokens) == len(ex.weights) == length
  context, questions = text.split("?")
  pairs = dict(p.split("=") for p in context.split())
  asked = [p.split("=") for p in questions.split()]
  assert len(asked) == data.MQAR_QUERIES
  for key, value in asked:
    assert pairs[key] == value
  weighted = bytes(t for t, w in zip(ex.tokens, ex.weights) if w).decode()
  assert weighted == "".join(v for _, v in asked)


def test_parse_mixture():
  assert data.parse_mixture("text:3,passkey:1") == {"text": 0.75, "passkey": 0.25}
  assert data.parse_mixture("mqar") == {"mqar": 1.0}
  with pytest.raises(ValueError, match="unknown task 'pass'"):
    data.parse_mixture("text,pass:1")
  with pytest.raises(ValueError, match="'mqar' needs seq_len >= 160"):
    data.parse_mixture("text,mqar", seq_len=100)


def packed_documents(batch, align):
  """Checks the packing properties of a batch (docs/semantics.md#packed-rows) and returns
  each row's documents.

  Returns [[(tokens, weights)]] per row: the tokens of each segment up to its
  last non-PAD token, and the loss weight of predicting each of them.
  """
  inputs, targets, weights, ids = (batch[k] for k in ("inputs", "targets", "weights",
                                                      "segment_ids"))
  assert ids.dtype == np.int32 and ids.shape == inputs.shape
  rows = []
  for r in range(len(ids)):
    step = np.diff(ids[r])
    # Documents numbered 0, 1, .. within the row, one contiguous run each.
    assert ids[r, 0] == 0 and set(step) <= {0, 1}, ids[r]
    starts = [0, *(np.flatnonzero(step) + 1)]
    assert all(s % align == 0 for s in starts), starts
    # Loss only on targets that are the next token of the same document.
    loss = np.flatnonzero(weights[r])
    assert np.all(loss < len(ids[r]) - 1)
    assert np.all(ids[r, loss + 1] == ids[r, loss]), "loss across a document boundary"
    np.testing.assert_array_equal(targets[r, loss], inputs[r, loss + 1])
    docs = []
    for start, stop in zip(starts, [*starts[1:], len(ids[r])]):
      n = 1 + np.flatnonzero(inputs[r, start:stop] != data.PAD).max()
      assert stop - start - n < align or stop == len(ids[r]), "padding beyond the next aligned start"
      # The document's last token predicts nothing; its padding carries no loss.
      assert np.all(weights[r, start + n - 1:stop] == 0)
      assert np.all(inputs[r, start + n:stop] == data.PAD)
      docs.append((inputs[r, start:start + n], np.concatenate([[0], weights[r, start:start + n - 1]])))
    rows.append(docs)
  return rows


def test_pack_documents_keeps_every_document_whole_and_aligned():
  T, A = 64, 16
  rng = np.random.default_rng(0)
  text = lambda n: bytes(rng.integers(1, 256, n, dtype=np.uint8))
  weighted = data.Example(np.arange(1, 21, dtype=np.int32), (np.arange(20) % 2).astype(np.float32))
  documents = [text(1), text(5), np.arange(1, A + 1), text(A + 1), b"", text(3 * T + 7),
               text(T), weighted, text(T - 1), np.arange(300, 300 + 2 * A)]
  batch = data.pack_documents(documents, seq_len=T, align=A)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((len(batch["inputs"]), T), np.int32), "targets": ((len(batch["inputs"]), T), np.int32),
      "weights": ((len(batch["inputs"]), T), np.float32),
      "segment_ids": ((len(batch["inputs"]), T), np.int32)}
  rows = packed_documents(batch, A)
  got = [(tuple(t), tuple(w[1:])) for row in rows for t, w in row]
  # Every document, a long one as row-sized pieces, appears once with its tokens in order.
  expected = []
  for doc in documents:
    for piece in data.pieces(data.as_example(doc), T):
      expected.append((tuple(piece.tokens.astype(np.int32)), tuple(piece.weights[1:])))
  assert sorted(got) == sorted(expected)
  # First fit, in order: each piece goes into the first row with room (the 7-token tail of
  # the long document fills row 0, the 20-token one row 1).
  assert [[len(t) for t, _ in row] for row in rows] == [
      [1, 5, A, 7], [A + 1, 20], [T], [T], [T], [T], [T - 1], [2 * A]]


def test_packed_text_rows_hold_whole_files_in_order():
  T, A = 256, 32
  val = data.validation_batches("text", seq_len=T, batch_size=4, num_batches=2, align=A)
  pieces = {f[i:i + T] for f in data.stdlib_documents(5)["val"] for i in range(0, len(f), T)}
  for batch in val:
    for row in packed_documents(batch, A):
      for tokens, weights in row:
        assert bytes(tokens.astype(np.uint8)) in pieces
        assert np.all(weights[1:] == 1)


@pytest.mark.parametrize("pack_tasks", [False, True])
def test_packed_task_rows_hold_whole_examples(pack_tasks):
  T, A = 1024, 64
  loader = data.Loader("passkey:1,mqar:1", seq_len=T, batch_size=8, align=A,
                       pack_tasks=pack_tasks)
  rows = packed_documents(next(loader), A)
  for row in rows:
    for tokens, weights in row:
      text = bytes(tokens.astype(np.uint8))
      if b"pass key" in text:
        assert text[:-data.PASSKEY_DIGITS].endswith(data.PASSKEY_QUESTION.encode())
        assert list(weights) == [0] * (len(text) - data.PASSKEY_DIGITS) + [1] * data.PASSKEY_DIGITS
      else:
        assert text.count(b"?") == 1
        assert weights.sum() == data.MQAR_QUERIES * data.MQAR_VALUE_DIGITS
  lengths = [len(t) for row in rows for t, _ in row]
  if pack_tasks:
    assert max(len(row) for row in rows) > 1 and min(lengths) < T // 2
  else:
    assert lengths == [T] * len(rows)


@pytest.mark.parametrize("align", [None, 32], ids=["windows", "packed"])
def test_text_weight_scales_the_text_tokens_only(align):
  kw = dict(seq_len=224, batch_size=8, seed=1, align=align)
  plain = data.Loader("text:1,passkey:1", **kw).batch_at(0)
  scaled = data.Loader("text:1,passkey:1", text_weight=0.25, **kw).batch_at(0)
  assert scaled.keys() == plain.keys()
  for key in plain.keys() - {"weights"}:
    np.testing.assert_array_equal(scaled[key], plain[key])
  text_rows = plain["weights"].sum(1) > data.PASSKEY_DIGITS
  assert 0 < text_rows.sum() < len(text_rows)
  np.testing.assert_array_equal(scaled["weights"],
                                np.where(text_rows[:, None], 0.25, 1.0) * plain["weights"])


def test_alignment_the_row_cannot_hold_is_an_error():
  with pytest.raises(ValueError, match=r"align=64 must be an int in 1..seq_len=32"):
    data.Loader("text", seq_len=32, batch_size=2, align=64)
  with pytest.raises(ValueError, match=r"align=0 must be an int in 1..seq_len=32"):
    data.pack_documents([b"abc"], seq_len=32, align=0)
  with pytest.raises(ValueError, match="pack_tasks=True needs packed rows"):
    data.Loader("passkey", seq_len=256, batch_size=2, pack_tasks=True)


@pytest.mark.parametrize("align,pack_tasks", [(None, False), (32, False), (32, True)],
                         ids=["windows", "packed", "packed-tasks"])
def test_loader_is_deterministic_and_resumes_from_its_state(align, pack_tasks):
  make = lambda: data.Loader("text:0.5,passkey:0.25,mqar:0.25", seq_len=224,
                             batch_size=6, seed=3, align=align, pack_tasks=pack_tasks)
  run = make()
  batches = [next(run) for _ in range(5)]
  b = batches[0]
  assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (6, 224)
  assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
  if align is None:   # random windows: one segment per row, targets the inputs shifted
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert "segment_ids" not in b   # one document per row: the model's unpacked path
  else:
    packed_documents(b, align)
  assert not all(np.array_equal(b["inputs"], c["inputs"]) for c in batches[1:])
  resumed = make()
  resumed.load_state_dict(_advanced(make(), 3).state_dict())
  for k in (3, 4):
    got = next(resumed)
    assert got.keys() == batches[k].keys()
    for key in b:
      np.testing.assert_array_equal(got[key], batches[k][key])
  with pytest.raises(ValueError, match="seed=3 differs"):
    data.Loader("text", seq_len=200, batch_size=6, seed=4).load_state_dict(
        run.state_dict())


def _advanced(loader, n):
  for _ in range(n):
    next(loader)
  return loader


def test_validation_batches_come_from_validation_files():
  val = data.validation_batches("text", seq_len=64, batch_size=2, num_batches=2)
  stream = data.stdlib_corpus(5)["val"].tobytes()
  for b in val:
    for row in b["inputs"]:
      assert bytes(row.astype(np.uint8)) in stream
