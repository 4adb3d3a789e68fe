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


def test_loader_is_deterministic_and_resumes_from_its_state():
  make = lambda: data.Loader("text:0.5,passkey:0.25,mqar:0.25", seq_len=200,
                             batch_size=6, seed=3)
  run = make()
  batches = [next(run) for _ in range(5)]
  b = batches[0]
  assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (6, 200)
  assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert not all(np.array_equal(b["inputs"], c["inputs"]) for c in batches[1:])
  resumed = make()
  resumed.load_state_dict(_advanced(make(), 3).state_dict())
  for k in (3, 4):
    got = next(resumed)
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
