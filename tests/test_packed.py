"""Packing is invisible (docs/semantics.md#packed-rows): every op, `nsa` and the model on
packed rows equal each document run alone, as a sequence of its own from position 0.

One property, tested as one: a jitted function runs every op (outputs, the selection,
gradients under random cotangents) on packed rows with `segment_ids` and on the documents
alone, each a batch row of its own padded at its end (`segments.Alone`); every output,
selection and gradient of a document's rows and keys must be equal, and compressed
blocks straddling two documents, seen by no query, get zero gradient. Documents come from
`data.pack_documents` (shorter than one compressed block, exactly one selection block,
crossing many); G in {1, 2, 16}, Dk != Dv; the reference in float64, the Pallas kernels in
interpret mode in float32; selected attention on random block indices over the whole row.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import NSAConfig, data, train_lib
from nsa_jax.model import ModelConfig, Transformer
from nsa_jax.ops import segments
from nsa_jax.ops.dense import TOKEN_BLOCKS, dense_attention
from tests import rand

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                  num_selected=4, window=16)
# l = l' and no initial block, window not a power of two.
ODD = NSAConfig(compress_block=16, compress_stride=8, select_block=16,
                num_selected=3, num_initial=0, num_local=1, window=24)
NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
BLOCK_INPUTS = ("k_cmp", "v_cmp")   # indexed by compressed block, the others by token


@dataclasses.dataclass(frozen=True)
class Case:
  """Documents of `lengths` packed into rows of T tokens; heads and config."""
  lengths: tuple[int, ...]
  T: int
  HKV: int
  G: int
  Dk: int
  Dv: int
  config: NSAConfig

  def segment_ids(self):
    documents = [np.ones(n, np.int32) for n in self.lengths]
    return data.pack_documents(documents, seq_len=self.T,
                               align=self.config.select_block)["segment_ids"]


CASES = [
    # rows [5 | 16 | 60 | 5 (< l, to the end)] and [70 | 20 (to the end)]
    Case((5, 16, 60, 5, 70, 20), T=101, HKV=2, G=1, Dk=16, Dv=8, config=SMALL),
    # [13 (< l) | 64 | 13 (to the end)]
    Case((13, 64, 13), T=93, HKV=2, G=2, Dk=16, Dv=24, config=ODD),
    # [64 | 16 | 3 (< l, to the end)]
    Case((64, 16, 3), T=83, HKV=1, G=16, Dk=8, Dv=16, config=SMALL),
]


def every_op(x, block_idx, cts, segment_ids, *, impl, config):
  """{name: array} of every op's outputs and input gradients (module doc)."""
  kw = dict(config=config, impl=impl, interpret=True, segment_ids=segment_ids)
  ct, ct_lse = cts
  out = {}

  def with_grads(name, f, names, cotangent, has_aux=False):
    y, vjp, *aux = jax.vjp(f, *(x[n] for n in names), has_aux=has_aux)
    out[name] = y
    if aux:
      out[f"{name} block_idx"] = aux[0]
    out.update({f"{name} d{n}": g for n, g in zip(names, vjp(cotangent))})

  def compressed(q, k, v):
    o, lse = nsa_jax.compressed_attention(q, k, v, **kw)
    return o, jnp.where(jnp.isfinite(lse), lse, 0.0)

  with_grads("compressed_attention", compressed, ("q", "k_cmp", "v_cmp"), (ct, ct_lse))
  out["select_blocks"] = nsa_jax.select_blocks(x["q"], x["k_cmp"], **kw)
  with_grads("selected_attention",
             lambda q, k, v: nsa_jax.selected_attention(q, k, v, block_idx, **kw),
             ("q", "k_slc", "v_slc"), ct)
  with_grads("window_attention", lambda q, k, v: nsa_jax.window_attention(q, k, v, **kw),
             ("q", "k_win", "v_win"), ct)
  with_grads("nsa", lambda *a: nsa_jax.nsa(*a, **kw, return_block_idx=True), NAMES, ct,
             has_aux=True)
  return out


def inputs(case: Case, dtype, B):
  cfg, T, HQ = case.config, case.T, case.HKV * case.G
  ks = rand.split(rand.key(case.T), 11)
  n = lambda k, *shape: rand.normal(k, shape, dtype)
  Tc = cfg.num_compressed(T)
  x = dict(q=n(ks[0], B, T, HQ, case.Dk),
           k_cmp=n(ks[1], B, Tc, case.HKV, case.Dk), v_cmp=n(ks[2], B, Tc, case.HKV, case.Dv),
           k_slc=n(ks[3], B, T, case.HKV, case.Dk), v_slc=n(ks[4], B, T, case.HKV, case.Dv),
           k_win=n(ks[5], B, T, case.HKV, case.Dk), v_win=n(ks[6], B, T, case.HKV, case.Dv),
           gates=jax.nn.sigmoid(n(ks[7], B, T, HQ, 3)))
  nb, slots = cfg.num_select_blocks(T), cfg.num_selected
  order = jnp.argsort(rand.uniform(ks[8], (B, T, case.HKV, max(nb, slots))), axis=-1)
  block_idx = jnp.where(order[..., :slots] < nb, order[..., :slots], -1).astype(jnp.int32)
  return x, block_idx, (n(ks[9], B, T, HQ, case.Dv), n(ks[10], B, T, HQ))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c.G}-T{c.T}")
def test_packing_is_invisible(case, impl):
  dtype = jnp.float64 if impl == "xla" else jnp.float32
  segment_ids = case.segment_ids()
  docs = segments.Alone(segment_ids, case.config)
  x, block_idx, cts = inputs(case, dtype, B=segment_ids.shape[0])
  run = jax.jit(lambda x, idx, cts, seg: every_op(x, idx, cts, seg, impl=impl,
                                                  config=case.config))
  packed = run(x, block_idx, cts, jnp.asarray(segment_ids))
  alone = run({n: docs.alone(a, blocks=n in BLOCK_INPUTS) for n, a in x.items()},
              docs.alone_selection(block_idx), tuple(docs.alone(c) for c in cts), None)
  for name, got in packed.items():
    if "block_idx" in name or name == "select_blocks":   # as sets
      want = docs.packed_selection(alone[name])
      np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1), err_msg=name)
      continue
    for i, (g, a) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(alone[name]))):
      want = np.asarray(docs.packed(a, g.shape, blocks=name.endswith(BLOCK_INPUTS)))
      scale = np.abs(want).max(initial=1.0)
      rtol = 1e-12 if impl == "xla" else 1e-5
      np.testing.assert_allclose(g, want, rtol=rtol, atol=rtol * scale,
                                 err_msg=f"{name} [{i}]")


def test_segment_ids_are_checked_where_concrete():
  """Documents that are not one contiguous run, or start off select_block, or ids of
  the wrong shape or dtype: a ValueError naming the values, from every op."""
  q = jnp.zeros((2, 64, 2, 8), jnp.float32)
  k = jnp.zeros((2, 64, 1, 8), jnp.float32)
  kw = dict(config=SMALL, impl="xla")
  ok = np.zeros((2, 64), np.int32)
  ok[:, 32:] = 1
  split = ok.copy()
  split[1, 48:] = 0
  with pytest.raises(ValueError, match=r"segment_ids row 1: id 0 forms 2 separate runs "
                                       r"\(starting at positions \[0, 48\]\)"):
    nsa_jax.window_attention(q, k, k, **kw, segment_ids=split)
  late = ok.copy()
  late[0, 24:] = 1
  with pytest.raises(ValueError, match="segment_ids row 0: the document of id 1 starts at "
                                       "position 24, not a multiple of select_block=16"):
    nsa_jax.select_blocks(q, k[:, :SMALL.num_compressed(64)], **kw, segment_ids=late)
  with pytest.raises(ValueError, match=r"segment_ids.shape=\(2, 63\) must be \[B, T\]"):
    nsa_jax.selected_attention(q, k, k, jnp.zeros((2, 64, 1, 4), jnp.int32), **kw,
                               segment_ids=ok[:, 1:])
  with pytest.raises(ValueError, match="segment_ids.dtype=float32"):
    nsa_jax.compressed_attention(q, k[:, :15], k[:, :15], **kw,
                                 segment_ids=ok.astype(np.float32))
  x = {n: jnp.zeros(s, jnp.float32) for n, s in [
      ("q", q.shape), ("k_cmp", (2, 15, 1, 8)), ("v_cmp", (2, 15, 1, 8)), ("k_slc", k.shape),
      ("v_slc", k.shape), ("k_win", k.shape), ("v_win", k.shape), ("gates", (2, 64, 2, 3))]}
  with pytest.raises(ValueError, match="starts at position 24"):
    nsa_jax.nsa(**x, **kw, segment_ids=late)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_model_loss_on_packed_rows_is_the_sum_over_documents(attention):
  """The model's loss sums (`train_lib.loss_sums`, which passes the batch's segment
  ids) on rows packed by `data.pack_documents` equal those of its documents each run
  alone, one per row (RoPE positions restart per document: docs/semantics.md#rope)."""
  config = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       nsa=SMALL, attention=attention, impl="xla")
  model = Transformer(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 64, n).astype(np.int32) for n in (5, 16, 70, 30, 3)]
  rows = data.pack_documents(docs, seq_len=96, align=SMALL.select_block)
  assert len(set(rows["segment_ids"][0])) > 2            # several documents in a row
  loss_sums = nnx.jit(lambda model, batch: train_lib.loss_sums(model, batch)[:2])
  packed = loss_sums(model, {k: jnp.asarray(v) for k, v in rows.items()})
  longest = max(len(d) for d in docs)
  alone = data.stack_rows([data.pack_row([data.Example(d, np.ones(len(d), np.float32))],
                                         longest, SMALL.select_block) for d in docs])
  alone.pop("segment_ids")
  each = loss_sums(model, {k: jnp.asarray(v) for k, v in alone.items()})
  np.testing.assert_allclose(packed, each, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_full_attention_on_packed_rows_is_causal_attention_per_document(impl):
  """The full-attention model's packed path (`dense.dense_attention`: compressed
  attention with one-token blocks, `TOKEN_BLOCKS`) equals jax's causal attention run
  on each document alone: output and gradients, reference and Pallas kernel."""
  T, HKV, G, D = 70, 2, 2, 16
  lengths = (5, 16, 40, 30, 60)   # rows [5 | 16 | 40 ..], [30 ..], [60 ..]
  segment_ids = data.pack_documents([np.ones(n, np.int32) for n in lengths], seq_len=T,
                                    align=8)["segment_ids"]
  B = segment_ids.shape[0]
  docs = segments.Alone(segment_ids, TOKEN_BLOCKS)
  ks = rand.split(rand.key(0), 4)
  q = rand.normal(ks[0], (B, T, HKV * G, D), jnp.float32)
  k, v = (rand.normal(key, (B, T, HKV, D), jnp.float32) for key in ks[1:3])
  ct = rand.normal(ks[3], q.shape, jnp.float32)
  packed = lambda q, k, v: dense_attention(q, k, v, impl=impl, interpret=True,
                                           segment_ids=jnp.asarray(segment_ids))
  alone = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  o, vjp = jax.vjp(jax.jit(packed), q, k, v)
  o_alone, vjp_alone = jax.vjp(alone, *(docs.alone(x) for x in (q, k, v)))
  for name, got, want in zip(("o", "dq", "dk", "dv"), (o, *vjp(ct)),
                             (o_alone, *vjp_alone(docs.alone(ct)))):
    np.testing.assert_allclose(got, docs.packed(want, got.shape), rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_decoding_refuses_segment_ids():
  """Decoding continues one document per row: segment ids are refused, clearly."""
  from nsa_jax import sampling
  model = Transformer(ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2,
                                  num_kv_heads=1, nsa=SMALL, impl="xla"), rngs=nnx.Rngs(0))
  prompt = jnp.ones((1, 32), jnp.int32)
  with pytest.raises(ValueError, match="decoding continues one document per row"):
    sampling.generate(model, prompt, jax.random.key(0), max_new_tokens=2,
                      segment_ids=jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids with attend"):
    model(prompt, segment_ids=jnp.zeros((1, 32), jnp.int32), attend=lambda i, attn, h: h)
