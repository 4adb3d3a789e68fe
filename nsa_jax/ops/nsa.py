"""The whole NSA operator: three branches mixed by gates (paper §3.2, Eq. 5; docs/semantics.md).

    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win

where the selection of o_slc comes from the compressed branch's scores of the
same queries (paper Eq. 8-11), from the lse that branch computed
(`selection.selection_lse`: the selection `select_blocks` makes on the same
inputs). Each branch may have its own keys and values. Packed rows (`segment_ids`,
docs/semantics.md#packed-rows) go to every branch: each query sees its own document only.

`nsa` checks its inputs once (`check_inputs`), derives the documents once
(`segments.bounds`) and chooses every branch's backend once (`backends`), then runs the
ops' unchecked internals (`compressed._compressed_attention` and its kind), which each
op's public function calls after its own checks.
"""
from __future__ import annotations

import jax
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, dispatch, segments
from nsa_jax.ops.compressed import _compressed_attention
from nsa_jax.ops.selected import _selected_attention
from nsa_jax.ops.selection import _select_blocks, _selection_lse, lse_backend, selected_scores
from nsa_jax.ops.window import _window_attention
from pallas_kernels._util import SAVED

# What a `jax.checkpoint` around `nsa` (and the projections that make its inputs) saves for
# the backward: the selection and the selected branch's output, lse and index, as its kernels
# and reference passes make them (named `pallas_kernels._util.SAVED`). The rest is
# recomputed from the checkpoint's inputs: the projections, RoPE, the compression MLPs, the
# gates, the window and compressed branches (cuDNN, Pallas or reference: about a millisecond
# a layer at the research shape), the layout copies and the mix (docs/memory.md; measured:
# experiments/PERF_NOTES.md, "Memory").
SAVE_POLICY = jax.checkpoint_policies.save_only_these_names(SAVED)


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config: NSAConfig,
        scale: float | None = None, impl: str = "auto",
        interpret: bool | None = None, return_block_idx: bool = False,
        segment_ids=None):
  """Native Sparse Attention over given per-branch keys and values.

  Args:
    q: [B, T, HQ, Dk] queries (shared by the three branches).
    k_cmp, v_cmp: [B, Tc, HKV, Dk/Dv] compressed keys/values, Tc = config.num_compressed(T).
    k_slc, v_slc: [B, T, HKV, Dk/Dv] keys/values for the selected branch.
    k_win, v_win: [B, T, HKV, Dk/Dv] keys/values for the sliding window.
    gates: [B, T, HQ, 3] gate values (cmp, slc, win), already through a sigmoid.
    impl: "xla" (reference), "pallas" (the GPU kernels) or "auto". With
      "pallas" and "auto" the window and compressed branches run on cuDNN
      wherever it takes the inputs (faster there than the Pallas kernels);
      "pallas" raises a ValueError for inputs no kernel of a branch takes,
      "auto" runs such a branch on the reference (`dispatch.NSA_BRANCHES`). With
      config.select_gate on, the selected branch is one
      (docs/selection_learning.md#straight-through-gate).
    return_block_idx: also return the [B, T, HKV, n] selection.
    segment_ids: [B, T] int, documents packed in a row (docs/semantics.md#packed-rows): runs
      of equal ids, each starting at a multiple of config.select_block (a
      ValueError otherwise, where the ids are concrete; under jit this is the
      caller's contract). Every query then sees only its own document, as if it
      were a sequence of its own from position 0. None: one document per row.
      The branches then run on the Pallas kernels, not cuDNN (`dispatch`).

  Returns:
    o [B, T, HQ, Dv] (and block_idx when asked).
  """
  check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config=config,
               segment_ids=segment_ids)
  impls = backends(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, config=config, impl=impl,
                   interpret=interpret, packed=segment_ids is not None)
  doc_start, doc_end = segments.bounds(segment_ids, q.shape[1])
  scale = _common.resolve_scale(scale, q)
  o_cmp, o_slc, block_idx = sparse_branches(
      q, k_cmp, v_cmp, k_slc, v_slc, impls=impls, config=config, scale=scale,
      interpret=interpret, doc_start=doc_start, doc_end=doc_end)
  o_win = _window_attention(q, k_win, v_win, config=config, scale=scale,
                            backend=impls["window_attention"], interpret=interpret,
                            doc_start=doc_start, doc_end=doc_end)
  o = mix(gates, o_cmp, o_slc, o_win)
  return (o, block_idx) if return_block_idx else o


def sparse_branches(q, k_cmp, v_cmp, k_slc, v_slc, *, impls: dict[str, str],
                    config: NSAConfig, scale: float | None, interpret: bool | None,
                    doc_start=None, doc_end=None, q_offset=None):
  """(o_cmp, o_slc, block_idx) of `nsa`: the compressed branch, the selection from its
  lse, the selected branch, on the backends `impls` (`backends`), over inputs `nsa`
  checked (`check_inputs`; nothing is checked here). doc_start, doc_end: the documents
  of packed rows (`segments.bounds`), or None.

  q_offset (context parallelism, `nsa_jax.context`): q holds the queries at positions
  q_offset .. of a sequence whose k_cmp, v_cmp, k_slc, v_slc and documents' ends are
  whole (doc_start: q's own).
  """
  scale = _common.resolve_scale(scale, q)
  kw = dict(config=config, scale=scale, interpret=interpret, q_offset=q_offset)
  o_cmp, lse = _compressed_attention(q, k_cmp, v_cmp, backend=impls["compressed_attention"],
                                     doc_start=doc_start, doc_end=doc_end, **kw)
  lse = _selection_lse(q, k_cmp, backend=impls["selection_lse"], doc_start=doc_start,
                       doc_end=doc_end, branch=(v_cmp, impls["compressed_attention"], lse),
                       **kw)
  block_idx = _select_blocks(q, k_cmp, lse, backend=impls["select_blocks"],
                             doc_start=doc_start, **kw)
  bias = None
  if config.select_gate == "straight_through":   # 0 forward, the scores' gradient backward
    s = selected_scores(q, k_cmp, block_idx, config=config, scale=scale, doc_start=doc_start,
                        q_offset=q_offset)
    bias = s - lax.stop_gradient(s)
  o_slc = _selected_attention(q, k_slc, v_slc, block_idx, backend=impls["selected_attention"],
                              doc_start=doc_start, block_bias=bias, **kw)
  return o_cmp, o_slc, block_idx


def mix(gates, o_cmp, o_slc, o_win):
  """Eq. 5: the branches' outputs weighted by their gates [B, T, HQ, 3]."""
  g = gates[..., None]
  return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win


def backends(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, *, config: NSAConfig,
             impl: str = "auto", interpret: bool | None = None,
             packed: bool = False, offset: bool = False) -> dict[str, str]:
  """What `nsa(impl=impl)` runs on these inputs (arrays or `jax.ShapeDtypeStruct`s),
  on packed rows (segment ids given) or not: {branch op: backend}
  (`dispatch.nsa_branches`) and "selection_lse": the backend of the compressed pass
  its selection's lse comes from (`selection.lse_backend`). Two impls with equal
  backends compute the same. Raises nsa's ValueError for inputs no backend of a
  branch takes. offset: q is a slice of the queries at a query offset
  (`sparse_branches`); the window takes none (under context it runs on its halo,
  `nsa_jax.context.window_attention`). With config.select_gate on, the selected
  branch takes the gate's block bias (`selection.selected_scores`)."""
  call = lambda offset, **arrays: dispatch.Call(arrays, config, interpret, packed, offset)
  gate = {}
  if config.select_gate != "none":
    B, T, _, _ = q.shape
    gate = dict(block_bias=jax.ShapeDtypeStruct(
        (B, T, k_cmp.shape[2], config.num_selected), _common.compute_dtype(q.dtype)))
  return dict(dispatch.nsa_branches(impl, {
      "compressed_attention": call(offset, q=q, k_cmp=k_cmp, v_cmp=v_cmp),
      "select_blocks": call(offset, q=q, k_cmp=k_cmp),
      "selected_attention": call(offset, q=q, k=k_slc, v=v_slc, **gate),
      "window_attention": call(False, q=q, k=k_win, v=v_win)}),
      selection_lse=lse_backend(q, k_cmp, config=config, impl=impl, interpret=interpret,
                                packed=packed, offset=offset))


def check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config: NSAConfig,
                 segment_ids=None):
  """`nsa`'s checks of its inputs (docs/api.md#errors): a ValueError naming argument and values."""
  _common.check_config(config)
  _common.check_attention_inputs(q, k_slc, v_slc, names=("q", "k_slc", "v_slc"))
  _common.check_attention_inputs(q, k_win, v_win, names=("q", "k_win", "v_win"))
  _common.check_attention_inputs(q, k_cmp, v_cmp, names=("q", "k_cmp", "v_cmp"),
                                 seq_len=config.num_compressed(q.shape[1]))
  B, T, HQ, _ = q.shape
  if gates.shape != (B, T, HQ, 3):
    raise ValueError(f"gates.shape={gates.shape} must be [B, T, HQ, 3]={(B, T, HQ, 3)}")
  _common.check_float("gates", gates, q.dtype)
  if segment_ids is not None:
    segments.check_segment_ids(segment_ids, q, config.select_block)
