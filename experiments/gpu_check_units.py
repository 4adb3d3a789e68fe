"""How experiments/gpu_check.py computes a case (gpu_check_cases.py) and compares it against
the reference: its inputs, its units, the error measures and thresholds.

What each op's check asserts, the error measure and the thresholds with their reasons:
docs/benchmarks.md#gpu-checks. The reference runs in float32 on upcast inputs at full
matmul precision, chunked and rematerialised. A case's ops are checked in units
(`UNIT_OF`), each one jitted function of the inputs that returns error measures only, so
that what several ops need (the reference selection, nsa's own selection) is computed once;
nsa and select_blocks under impls "auto" and "pallas" that run the same backends
(`nsa_jax.ops.nsa.backends`) are computed once and recorded under each impl.
gpu_check_runner.py lowers, compiles and runs the units.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")   # reference backward is big

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from experiments.gpu_check_cases import Case
from nsa_jax import (NSAConfig, compressed_attention, nsa, select_blocks,
                     selected_attention, window_attention)
from nsa_jax.ops import _common, compressed, cudnn, dispatch, segments, selected, window
from nsa_jax.ops.compressed import compressed_scores
from nsa_jax.ops.distill import selection_distill_loss
from nsa_jax.ops.nsa import backends as nsa_backends
from nsa_jax.ops.nsa import sparse_branches as nsa_sparse_branches
from nsa_jax.ops.selection import lse_backend, overlap_to_select_blocks

RTOL = {"float32": 1e-3, "bfloat16": 2e-2}
# Near-tie tolerance of the selection, relative to the row's largest
# non-forced candidate score: scores are sums of softmax probabilities that
# the two implementations compute in different orders (float32 inputs: TF32).
TIE_RTOL = 5e-3
# Share of rows where nsa's selection may differ from select_blocks' (issue
# #18's bounds). Both select from one lse by construction, so 0 is expected.
SELECTION_TOL = {"float32": 0.0, "bfloat16": 1e-3}
NSA_ARGS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
QUERY_ARGS = ("q", "gates")   # inputs indexed by query position, the others by key
BLOCK_ARGS = ("k_cmp", "v_cmp")   # inputs indexed by compressed block


def tolerance(op: str, dtype: str) -> float:
  return {"select_blocks": TIE_RTOL, "nsa_vs_select_blocks": SELECTION_TOL[dtype],
          "sparse_branches_selection": SELECTION_TOL[dtype]}.get(op, RTOL[dtype])


# ----------------------------------------------------------------------------
# Error measures (traced inside each case's jitted function)
# ----------------------------------------------------------------------------
@jax.jit
def compare(a, b):
  """(||a - b|| / ||b|| over entries where b is finite; max |a - b| / max |b|,
  reported only: it shows localised errors the norm averages away; whether a
  is NaN-free and non-finite exactly where b is, with the same value there)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  finite = jnp.isfinite(b)
  diff = jnp.where(finite, a - b, 0.0)
  ref = jnp.where(finite, b, 0.0)
  err = jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
  max_rel = (jnp.max(jnp.abs(diff), initial=0.0)        # initial: empty arrays (T < l: Tc = 0)
             / jnp.maximum(jnp.max(jnp.abs(ref), initial=0.0), 1e-30))
  same_pattern = jnp.all(jnp.isfinite(a) == finite) & jnp.all(jnp.where(finite, True, a == b))
  return err, max_rel, same_pattern & ~jnp.any(jnp.isnan(a))


def reference_precision(dtype: str):
  """float32 references at full precision (XLA's GPU default for float32 is TF32)."""
  return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


def reference_scores(q, k_cmp, *, config: NSAConfig):
  """Block scores score[b, t, g, j] [B, T, HKV, Ts] float32
  (docs/semantics.md#importance-scores)."""
  B, T, HQ, _ = q.shape
  HKV, Ts = k_cmp.shape[2], config.num_select_blocks(T)
  scale = _common.resolve_scale(None, q)
  if k_cmp.shape[1] == 0:
    return jnp.zeros((B, T, HKV, Ts), jnp.float32)

  def chunk_fn(start, qc):
    s, mask = compressed_scores(qc, start, k_cmp, config, scale)
    p, _ = _common.masked_softmax(s, mask)                 # [B, HKV, G, C, Tc]
    scores = overlap_to_select_blocks(p.sum(axis=2), config, Ts)
    return jnp.moveaxis(scores, 1, 2).astype(jnp.float32)   # [B, C, HKV, Ts]

  return _common.map_query_chunks(chunk_fn, (q,), 256)


def selection_check(block_idx, scores, *, config: NSAConfig, valid=None):
  """(rows breaking a hard rule, worst near-tie gap) of a selection [B, T, HKV, n].

  Hard rules (docs/semantics.md#selection): entries in [-1, Ts), no duplicates, min(n, #candidates)
  blocks, all of them candidates (j*l' <= t), the forced blocks among them.
  The gap of a row is (best unselected candidate - worst selected non-forced
  block) / largest non-forced candidate score, clipped at 0: 0 for an exact
  top-n, small for a near-tie swap. valid: [B, T] bool, the rows judged (all).
  """
  B, T, HKV, n = block_idx.shape
  Ts = scores.shape[-1]
  t = jnp.arange(T)[None, :, None, None]
  j = jnp.arange(Ts)[None, None, None, :]
  cur = t // config.select_block
  cand = j <= cur                                                      # [1, T, 1, Ts]
  forced = cand & ((j < config.num_initial) | (j > cur - config.num_local))
  count = jnp.sum(block_idx[..., None] == j[..., None, :], axis=-2)    # [B, T, HKV, Ts]
  sel = count > 0
  want = jnp.minimum(n, cur[..., 0] + 1)
  bad = (jnp.any((block_idx < -1) | (block_idx >= Ts), axis=-1)
         | jnp.any(count > 1, axis=-1)
         | (jnp.sum(sel, axis=-1) != want)
         | (jnp.sum(block_idx == -1, axis=-1) != n - want)
         | jnp.any(sel & ~cand, axis=-1)
         | jnp.any(forced & ~sel, axis=-1))
  free = cand & ~forced
  worst_in = jnp.min(jnp.where(sel & free, scores, jnp.inf), axis=-1)
  best_out = jnp.max(jnp.where(free & ~sel, scores, -jnp.inf), axis=-1)
  top = jnp.max(jnp.where(free, jnp.abs(scores), 0.0), axis=-1)
  gap = jnp.where(jnp.isfinite(worst_in) & jnp.isfinite(best_out),
                  jnp.maximum(best_out - worst_in, 0.0) / jnp.maximum(top, 1e-30), 0.0)
  if valid is not None:
    bad, gap = bad & valid[..., None], jnp.where(valid[..., None], gap, 0.0)
  return jnp.sum(bad), jnp.max(gap)


def rows_differing(a, b):
  """Rows (query, KV head) whose selected sets differ, order ignored."""
  return jnp.sum(jnp.any(jnp.sort(a, axis=-1) != jnp.sort(b, axis=-1), axis=-1))


def gated_reference(config: NSAConfig, first: int = 0):
  """nsa's formula (paper Eq. 5) over the reference branches, with a given
  selection, for the queries at positions first, first + 1, ... (all keys given)."""
  def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_idx):
    kw = dict(config=config, scale=_common.resolve_scale(None, q), first=first)
    g = gates[..., None]
    return (g[..., 0, :] * compressed.compressed_attention_xla(q, k_cmp, v_cmp, **kw)[0]
            + g[..., 1, :] * selected.selected_attention_xla(q, k_slc, v_slc, block_idx, **kw)
            + g[..., 2, :] * window.window_attention_xla(q, k_win, v_win, **kw))
  return f


def upcast(tree):
  """float32 copies of the floating leaves (the reference's inputs)."""
  return jax.tree.map(
      lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def measure(a, b) -> dict:
  err, max_rel, ok = compare(a, b)
  return {"rel": err, "max_rel": max_rel, "ok": ok}


# ----------------------------------------------------------------------------
# A case: its random inputs, then its units (jitted functions of the inputs)
# ----------------------------------------------------------------------------
# A case's ops are checked in units, one jitted function each, that compile
# concurrently. Ops that share computed values share a unit: select_blocks and
# selected_attention the reference selection, nsa and nsa_vs_select_blocks the
# selection nsa made; the two flash-style branches share nothing but are small.
UNIT_OF = {"compressed_attention": "branches", "window_attention": "branches",
           "select_blocks": "selection", "selected_attention": "selection",
           "nsa": "nsa", "nsa_vs_select_blocks": "nsa", "distill_teacher": "teacher"}


def units(case: Case) -> list[Case]:
  """`case` split into its units: cases holding the ops of one unit each."""
  groups = {}
  for op in case.ops:
    groups.setdefault(UNIT_OF[op[0]], []).append(op)
  return [dataclasses.replace(case, ops=tuple(ops)) for ops in groups.values()]


def case_inputs(case: Case, config: NSAConfig):
  """key -> the case's random inputs (`bc.random_nsa_inputs`, with "cotangent")
  and "d_lse", a random cotangent of the compressed branch's lse."""
  s = case.shape

  def make(key):
    x = bc.random_nsa_inputs(s.B, s.T, s.HQ, s.HKV, s.Dk, s.Dv, config,
                             jnp.dtype(case.dtype), key)
    x["d_lse"] = jax.random.normal(jax.random.fold_in(key, 1), (s.B, s.T, s.HQ), jnp.float32)
    return x
  return make


def differentiable(op: str, config: NSAConfig, impl: str, first: int, segment_ids=None):
  """(arg names, op under test (on packed rows where segment_ids), reference on
  float32 queries from `first`, output names) of an op with gradients. Both take
  (*args, block_idx) and return (outputs, aux): nsa's aux is the selection it made,
  the others' None."""
  ref_kw = lambda q: dict(config=config, scale=_common.resolve_scale(None, q), first=first)
  kw = dict(config=config, impl=impl, segment_ids=segment_ids)
  if op == "compressed_attention":
    return (("q", "k_cmp", "v_cmp"),
            lambda q, k, v, _: (compressed_attention(q, k, v, **kw), None),
            lambda q, k, v, _: (compressed.compressed_attention_xla(q, k, v, **ref_kw(q)), None),
            ("o", "lse"))
  if op == "selected_attention":
    return (("q", "k_slc", "v_slc"),
            lambda q, k, v, idx: (selected_attention(q, k, v, idx, **kw), None),
            lambda q, k, v, idx: (selected.selected_attention_xla(q, k, v, idx, **ref_kw(q)),
                                  None),
            ("o",))
  if op == "window_attention":
    return (("q", "k_win", "v_win"),
            lambda q, k, v, _: (window_attention(q, k, v, **kw), None),
            lambda q, k, v, _: (window.window_attention_xla(q, k, v, **ref_kw(q)), None),
            ("o",))
  assert op == "nsa", op
  reference = gated_reference(config, first)
  return (NSA_ARGS,
          lambda *a: nsa(*a[:-1], **kw, return_block_idx=True),
          lambda *a: (reference(*a), None), ("o",))


def forward_backward(fn, args, block_idx, cotangent):
  """((outputs, gradients of args under `cotangent`), aux) of fn(*args, block_idx)."""
  out, vjp, aux = jax.vjp(lambda *a: fn(*a, block_idx), *args, has_aux=True)
  return (out, vjp(cotangent)), aux


def unit_function(case: Case, config: NSAConfig):
  """f(inputs) -> {"op|impl": {quantity: {"rel", "max_rel", "ok", ...}}} for every
  op of `case` (one unit), on the inputs `case_inputs` makes."""
  s, dtype = case.shape, case.dtype
  highest = lambda: reference_precision("float32")
  packed = case.kind == "packed"
  segment_ids = case.segment_ids() if packed else None
  docs = segments.Alone(segment_ids, config) if packed else None
  # The reference's view of an input: a "packed" case's documents alone.
  view = (lambda name, a: docs.alone(a, blocks=name in BLOCK_ARGS)) if packed else (
      lambda name, a: a)

  def f(x):
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    memo = {}

    def once(name, fn):   # values several ops need, computed once
      if name not in memo:
        memo[name] = fn()
      return memo[name]

    def nsa_key(impl):   # impls with equal backends compute the same: once
      backends = nsa_backends(*(x[n] for n in NSA_ARGS[:-1]), config=config, impl=impl,
                              packed=packed)
      return tuple(sorted(backends.items()))

    def alone_key(impl):   # what select_blocks(impl=impl) runs: its kernel, its lse's pass
      call = dispatch.Call(dict(q=x["q"], k_cmp=x["k_cmp"]), config, None, packed)
      return (dispatch.choose("select_blocks", impl, call),
              lse_backend(x["q"], x["k_cmp"], config=config, impl=impl, packed=packed))

    def selection_alone(impl):
      return once(("select_blocks", alone_key(impl)),
                  lambda: select_blocks(x["q"], x["k_cmp"], config=config, impl=impl,
                                        segment_ids=seg))

    def reference_selection():   # of the documents alone in a "packed" case
      with reference_precision(dtype):
        return select_blocks(view("q", x["q"]), view("k_cmp", x["k_cmp"]), config=config,
                             impl="xla")

    def gradients(op, impl):
      """(errors of the op's outputs and gradients, the op's aux)."""
      first = s.T - case.rows if case.kind == "rows" else 0
      names, fn, ref_fn, outputs = differentiable(op, config, impl, first, seg)
      idx = once("xla", reference_selection) if op == "selected_attention" else None
      if packed and idx is not None:
        idx = docs.packed_selection(idx)
      ct = x["cotangent"]
      if op == "compressed_attention":   # cuDNN's lse carries no gradient
        ct = (ct, jnp.zeros_like(x["d_lse"]) if impl == "cudnn" else x["d_lse"])
      if case.kind == "rows":   # a cotangent that is zero on the other rows
        keep = (jnp.arange(s.T) >= first)[None, :, None]
        ct = jax.tree.map(lambda c: c * keep[..., None] if c.ndim == 4 else c * keep, ct)
      args = [x[n] for n in names]
      quantities = list(outputs) + ["d" + n for n in names]
      along = [True] * len(outputs) + [n in QUERY_ARGS for n in names]   # per query row?
      got, aux = forward_backward(fn, args, idx, ct)
      got = jax.tree.leaves(got)
      if op == "nsa":   # the reference runs on the selection nsa made
        idx = aux
      if case.kind == "batch":   # the last row within the batch against that row alone
        last = lambda t: jax.tree.map(lambda a: a[-1:], t)
        got, (want, _) = last(got), forward_backward(fn, last(args), last(idx), last(ct))
      elif packed:   # against the reference on the documents alone, mapped back
        ref_args = [view(n, a) for n, a in zip(names, args)]
        with highest():
          want, _ = forward_backward(ref_fn, upcast(ref_args),
                                     None if idx is None else docs.alone_selection(idx),
                                     upcast(jax.tree.map(docs.alone, ct)))
        blocks = [False] * len(outputs) + [n in BLOCK_ARGS for n in names]
        want = [docs.packed(b, a.shape, blocks=by_block)
                for by_block, a, b in zip(blocks, got, jax.tree.leaves(want))]
      elif case.kind == "rows":   # the last rows against the reference on those rows only
        rows = lambda t: jax.tree.map(lambda a: a[:, first:], t)
        got = [rows(a) if per_row else a for per_row, a in zip(along, got)]
        ref_args = [rows(a) if n in QUERY_ARGS else a for n, a in zip(names, args)]
        with highest():
          want, _ = forward_backward(ref_fn, upcast(ref_args), rows(idx), upcast(rows(ct)))
      else:
        with highest():
          want, _ = forward_backward(ref_fn, upcast(args), idx, upcast(ct))
      return {q: measure(a, b) for q, a, b in zip(quantities, got, jax.tree.leaves(want))}, aux

    def nsa_check(impl):
      return once(("nsa", nsa_key(impl)), lambda: gradients("nsa", impl))

    def nsa_selection(impl):   # from the checked nsa call where there is one
      if any(op == "nsa" and nsa_key(other) == nsa_key(impl) for op, other in case.ops):
        return nsa_check(impl)[1]
      return once(("nsa forward", nsa_key(impl)), lambda: nsa(
          *(x[n] for n in NSA_ARGS), config=config, impl=impl, return_block_idx=True,
          segment_ids=seg)[1])

    def selection(impl):
      got = selection_alone(impl)
      ref = once("xla", reference_selection)
      with reference_precision(dtype):
        scores = reference_scores(view("q", x["q"]), view("k_cmp", x["k_cmp"]), config=config)
      valid = docs.valid() if packed else None
      out = {}
      for name, idx in [("block_idx", docs.alone_selection(got) if packed else got),
                        ("block_idx[xla]", ref)]:
        bad, gap = selection_check(idx, scores, config=config, valid=valid)
        out[name] = {"rel": gap, "max_rel": gap, "ok": bad == 0, "bad_rows": bad}
      if packed:   # blocks outside the query's document (dropped by alone_selection)
        outside = rows_differing(got, docs.packed_selection(docs.alone_selection(got)))
        out["block_idx"].update(ok=out["block_idx"]["ok"] & (outside == 0),
                                rows_outside_document=outside)
      out["block_idx"]["rows_differing_from_xla"] = rows_differing(
          got, docs.packed_selection(ref) if packed else ref)
      return out

    def agreement(impl):
      ours = nsa_selection(impl)
      differ = rows_differing(ours, selection_alone(impl))
      share = differ / ours[..., 0].size
      return {"block_idx": {"rel": share, "max_rel": share, "ok": True,
                            "rows_differing": differ}}

    def teacher(impl):
      """The selection distillation loss and its gradients with the teacher on `impl`,
      against the loss with the reference teacher (the student is the same XLA code)."""
      def loss(impl):
        return jax.value_and_grad(lambda q, k_cmp: selection_distill_loss(
            q, k_cmp, x["k_slc"], config=config, impl=impl, segment_ids=seg),
            argnums=(0, 1))(x["q"], x["k_cmp"])
      got = jax.tree.leaves(loss(impl))
      with highest():
        want = jax.tree.leaves(loss("xla"))
      return {q: measure(a, b) for q, a, b in zip(("loss", "dq", "dk_cmp"), got, want)}

    checks = {"select_blocks": selection, "nsa_vs_select_blocks": agreement,
              "nsa": lambda impl: nsa_check(impl)[0], "distill_teacher": teacher}
    return {f"{op}|{impl}": checks[op](impl) if op in checks else gradients(op, impl)[0]
            for op, impl in case.ops}
  return f


@contextlib.contextmanager
def cudnn_limits(limits):
  """Sets `nsa_jax.ops.cudnn` limit constants while a unit is traced (probes)."""
  saved = {name: getattr(cudnn, name) for name, _ in limits}
  try:
    for name, value in limits:
      setattr(cudnn, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(cudnn, name, value)


def offsets_function(case: Case, config: NSAConfig):
  """f(inputs) -> {"sparse_branches|pallas": outputs (o_cmp, o_slc) and the gradients of
  q, k_cmp, v_cmp, k_slc, v_slc, "sparse_branches_selection|pallas": the share of (query,
  KV head) rows whose selection differs}, of the slices at their offsets against the
  whole call at offset 0."""
  s = case.shape
  ids = jnp.asarray(case.segment_ids()) if case.runs else None
  names = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc")

  def branches(q, k_cmp, v_cmp, k_slc, v_slc, q_offset):
    impls = nsa_backends(q, k_cmp, v_cmp, k_slc, v_slc, k_slc, v_slc, config=config,
                         impl="pallas", packed=ids is not None, offset=True)
    doc_start, doc_end = segments.bounds(ids, q.shape[1], q_offset)
    return nsa_sparse_branches(q, k_cmp, v_cmp, k_slc, v_slc, impls=impls, config=config,
                               scale=None, interpret=None, doc_start=doc_start,
                               doc_end=doc_end, q_offset=q_offset)

  def sliced(offsets, q, *kv):   # offsets: traced int32, as lax.axis_index gives a shard
    parts = [branches(q[:, i * case.rows:(i + 1) * case.rows], *kv, offsets[i])
             for i in range(s.T // case.rows)]
    return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))

  def f(x, offsets):
    args = [x[n] for n in names]
    cts = (x["cotangent"], x["cotangent"][..., ::-1])   # o_cmp's, o_slc's
    run = lambda fn: jax.vjp(lambda *a: (lambda r: (r[:2], r[2]))(fn(*a)), *args, has_aux=True)
    (o, vjp, idx), (o_ref, vjp_ref, idx_ref) = (
        run(lambda *a: sliced(offsets, *a)), run(lambda *a: branches(*a, jnp.int32(0))))
    m = {name: measure(a, b) for name, a, b in zip(("o_cmp", "o_slc"), o, o_ref)}
    m |= {f"d{n}": measure(a, b) for n, a, b in zip(names, vjp(cts), vjp_ref(cts))}
    differing = rows_differing(idx, idx_ref) / idx[..., 0].size
    return {"sparse_branches|pallas": m, "sparse_branches_selection|pallas": {
        "block_idx": {"rel": differing, "max_rel": differing, "ok": True}}}
  return f
