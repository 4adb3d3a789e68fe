"""The whole NSA operator: three branches mixed by gates (paper §3.2, Eq. 5; SPEC §3).

    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win

where the selection of o_slc comes from the compressed branch's scores of the
same queries (paper Eq. 8-11), from the lse that branch computed
(`selection.selection_lse`: the selection `select_blocks` makes on the same
inputs). Each branch may have its own keys and values.
"""
from __future__ import annotations

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, dispatch
from nsa_jax.ops.compressed import compressed_attention
from nsa_jax.ops.selected import selected_attention
from nsa_jax.ops.selection import lse_backend, select_blocks, selection_lse
from nsa_jax.ops.window import window_attention


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config: NSAConfig,
        scale: float | None = None, impl: str = "auto",
        interpret: bool | None = None, return_block_idx: bool = False):
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
      "auto" runs such a branch on the reference (`dispatch.NSA_BRANCHES`).
    return_block_idx: also return the [B, T, HKV, n] selection.

  Returns:
    o [B, T, HQ, Dv] (and block_idx when asked).
  """
  check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config=config)
  impls = backends(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, config=config, impl=impl,
                   interpret=interpret)
  kw = lambda op: dict(config=config, scale=scale, impl=impls[op], interpret=interpret)
  o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, **kw("compressed_attention"))
  lse = selection_lse(q, k_cmp, config=config, scale=_common.resolve_scale(scale, q),
                      impl=impl, interpret=interpret,
                      branch=(v_cmp, impls["compressed_attention"], lse))
  block_idx = select_blocks(q, k_cmp, lse=lse, **kw("select_blocks"))
  o_slc = selected_attention(q, k_slc, v_slc, block_idx, **kw("selected_attention"))
  o_win = window_attention(q, k_win, v_win, **kw("window_attention"))
  g = gates[..., None]
  o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
  return (o, block_idx) if return_block_idx else o


def backends(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, *, config: NSAConfig,
             impl: str = "auto", interpret: bool | None = None) -> dict[str, str]:
  """What `nsa(impl=impl)` runs on these inputs (arrays or `jax.ShapeDtypeStruct`s):
  {branch op: backend} (`dispatch.nsa_branches`) and "selection_lse": the backend
  of the compressed pass its selection's lse comes from (`selection.lse_backend`).
  Two impls with equal backends compute the same. Raises nsa's ValueError for
  inputs no backend of a branch takes."""
  call = lambda **arrays: dispatch.Call(arrays, config, interpret)
  return dict(dispatch.nsa_branches(impl, {
      "compressed_attention": call(q=q, k_cmp=k_cmp, v_cmp=v_cmp),
      "select_blocks": call(q=q, k_cmp=k_cmp),
      "selected_attention": call(q=q, k=k_slc, v=v_slc),
      "window_attention": call(q=q, k=k_win, v=v_win)}),
      selection_lse=lse_backend(q, k_cmp, config=config, impl=impl, interpret=interpret))


def check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config: NSAConfig):
  """`nsa`'s checks of its inputs (SPEC §4): a ValueError naming the argument and values."""
  _common.check_config(config)
  _common.check_attention_inputs(q, k_slc, v_slc, names=("q", "k_slc", "v_slc"))
  _common.check_attention_inputs(q, k_win, v_win, names=("q", "k_win", "v_win"))
  _common.check_attention_inputs(q, k_cmp, v_cmp, names=("q", "k_cmp", "v_cmp"),
                                 seq_len=config.num_compressed(q.shape[1]))
  B, T, HQ, _ = q.shape
  if gates.shape != (B, T, HQ, 3):
    raise ValueError(f"gates.shape={gates.shape} must be [B, T, HQ, 3]={(B, T, HQ, 3)}")
  _common.check_float("gates", gates, q.dtype)
