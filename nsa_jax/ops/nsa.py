"""The whole NSA operator: three branches mixed by gates (paper §3.2, Eq. 5; SPEC §3).

    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win

where the selection of o_slc comes from the compressed branch's scores of the
same queries (paper Eq. 8-11), from the lse that branch computed
(`selection.selection_lse`: the selection `select_blocks` makes on the same
inputs). Each branch may have its own keys and values.
"""
from __future__ import annotations

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, compressed, cudnn, selection, window
from nsa_jax.ops.compressed import compressed_attention
from nsa_jax.ops.selected import selected_attention
from nsa_jax.ops.selection import select_blocks


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
    impl: "xla" (reference), "pallas" (kernels) or "auto" (kernels on a GPU).
      With "pallas" and "auto" the window and compressed branches run on
      cuDNN wherever `cudnn.cudnn_runs` (faster there than the Pallas
      kernels; `cudnn.cudnn_branch_impl`, `compressed.branch_impl`).
    return_block_idx: also return the [B, T, HKV, n] selection.

  Returns:
    o [B, T, HQ, Dv] (and block_idx when asked).
  """
  _common.check_config(config)
  _common.check_attention_inputs(q, k_slc, v_slc, names=("q", "k_slc", "v_slc"))
  _common.check_attention_inputs(q, k_win, v_win, names=("q", "k_win", "v_win"))
  B, T, HQ, _ = q.shape
  if gates.shape != (B, T, HQ, 3):
    raise ValueError(f"gates.shape={gates.shape} must be [B, T, HQ, 3]={(B, T, HQ, 3)}")
  _common.check_float("gates", gates, q.dtype)
  _common.check_impl(impl)
  kw = dict(config=config, scale=scale, impl=impl, interpret=interpret)
  cmp_impl = compressed.branch_impl(impl, q, v_cmp, config, interpret)
  o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, **dict(kw, impl=cmp_impl))
  lse = selection.selection_lse(q, k_cmp, config=config, scale=_common.resolve_scale(scale, q),
                                impl=impl, interpret=interpret, branch=(cmp_impl, lse))
  block_idx = select_blocks(q, k_cmp, lse=lse, **kw)
  o_slc = selected_attention(q, k_slc, v_slc, block_idx, **kw)
  o_win = window.window_attention(
      q, k_win, v_win, **dict(kw, impl=cudnn.cudnn_branch_impl(impl, q, v_win, interpret)))
  g = gates[..., None]
  o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
  return (o, block_idx) if return_block_idx else o
