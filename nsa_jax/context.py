"""Context parallelism: every sequence split along T over the mesh axis "context" (issue #23).

Per-shard functions, called under `jax.shard_map` over the mesh axis `AXIS` (the wrappers:
`nsa_jax.sharding`). Shard c of P holds the Tl = T / P tokens at global positions
q0 = c*Tl .. q0 + Tl - 1 of each of its rows (`sharding.batch_sharding`). Everything in the
model but attention is per token and runs where its tokens are (GSPMD; the loss is a sum over
all shards' tokens over the global weight, which XLA reduces across shards). Attention needs what crosses a shard boundary; under
`jax.shard_map`, per shard:

* compression (paper §3.3.1, Eq. 7): block i covers tokens [i*d, i*d + l), so the blocks that
  end in a shard start up to l - d tokens before it. Each shard receives those tokens from its
  predecessor (`halo`, a `ppermute`) and compresses the Tl/d blocks that end in it
  (`sharding.with_halo`, called by the module); shard 0's first l/d - 1 such slots lie before the
  sequence and are dropped. The compressed keys and values, T/d per row, are all-gathered.
* compressed attention and selection (Eq. 8-11): the shard's queries against all compressed
  keys, with a query offset q0 (the ops' private `q_offset`, which the Pallas kernels and the
  references take; cuDNN does not, so these branches run on the kernels on a GPU): the
  unsharded computation of its rows.
* selected attention (Eq. 10-12): a query may select any block before it, so the selected
  branch's K/V are all-gathered: B/(data*fsdp) x T x HKV/heads x (Dk + Dv) elements per device
  and layer (gpu-small, bf16, B = 1: 512 bytes per token of the sequence, 64 MiB at T = 128k),
  and as many float cotangents in the backward before they are reduce-scattered to their owners.
* sliding window (§3.3.3): the w - 1 keys before the shard (`halo`; over several hops when a
  shard holds fewer than w - 1 tokens). The window op runs on [halo; local] (`window_attention`),
  unchanged on any backend (cuDNN, Pallas, the reference).
* packed rows (SPEC §6, `segment_ids` [B, T] split like the tokens): the ids are
  all-gathered (4 bytes per token) for the documents of the gathered keys; the window
  takes the halo of the ids with its keys. RoPE positions in the documents are computed
  on the whole (sharded) array by XLA (`nsa_jax.module`).

Gradients return to the shard that owns each token through the transposes of the collectives,
which jax derives: all_gather -> psum_scatter, ppermute -> the reverse ppermute, and an input
replicated over "context" (the compressed keys) -> psum of the shards' partial cotangents.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import window
from nsa_jax.ops.nsa import backends, mix, sparse_branches

AXIS = "context"


def halo(x, size: int, num_shards: int):
  """The `size` rows (axis 1) before this shard's first row: the last rows of the shards before
  it, zeros before the start of the sequence. Call under `shard_map` over `AXIS`; x is this
  shard's [B, Tl, ...]. A shard holding fewer than `size` rows passes on its predecessors'
  (ceil(size / Tl) hops, each a `ppermute` of only the rows it needs)."""
  Tl = x.shape[1]
  hops = -(-size // Tl)
  parts = []
  for h in range(hops, 0, -1):   # from the farthest shard back to the nearest
    rows = size - (hops - 1) * Tl if h == hops else Tl
    part = x[:, Tl - rows:]
    parts.append(lax.ppermute(part, AXIS, [(i, i + h) for i in range(num_shards - h)])
                 if h < num_shards else jnp.zeros_like(part))
  return jnp.concatenate(parts, axis=1) if parts else x[:, :0]


def window_attention(q, k, v, segment_ids, *, config: NSAConfig, scale: float | None,
                     backend: str, interpret: bool | None, num_shards: int):
  """Sliding-window attention of this shard's queries (paper §3.3.3), under `shard_map`.

  The window op runs on keys [halo; local], w - 1 + Tl of them, with as many queries (zeros for
  the halo's rows, whose outputs are dropped: a cost of (w - 1) / Tl over the unsharded branch),
  so that query and key i sit at the same place as the op requires, on any backend (cuDNN
  included: no query offset). Where the halo reaches before position 0 (the first shards),
  those rows must see nothing: the arrays are rotated by that many rows, moving them to the
  end, after every real query, where causality hides them. segment_ids: this shard's [B, Tl]
  (packed rows) or None; extended the same way (documents are positions to the op: a
  document starting in the halo starts there, one starting before it is cut at the halo's
  start, which no window reaches past).
  """
  h = config.window - 1
  first = lax.axis_index(AXIS) * q.shape[1]
  before_start = jnp.maximum(h - first, 0)      # halo rows at positions < 0
  def extend(x, front=None):
    front = halo(x, h, num_shards) if front is None else front
    return jnp.roll(jnp.concatenate([front, x], axis=1), -before_start, axis=1)
  q_ext = extend(q, jnp.zeros((q.shape[0], h) + q.shape[2:], q.dtype))
  o = window.window_attention(q_ext, extend(k), extend(v), config=config, scale=scale,
                              impl=backend, interpret=interpret,
                              segment_ids=None if segment_ids is None else extend(segment_ids))
  return jnp.roll(o, before_start, axis=1)[:, h:]


def local_nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, segment_ids=None,
              config: NSAConfig, scale: float | None, impl: str, interpret: bool | None,
              return_block_idx: bool, num_shards: int):
  """`nsa_jax.ops.nsa.nsa` of one shard's queries, under `shard_map` over `AXIS` (module doc).

  q, k_slc, v_slc, k_win, v_win, gates, segment_ids (packed rows, or None): this shard's
  [B, Tl, ...] rows; k_cmp, v_cmp: all Tc = config.num_compressed(T) compressed blocks of
  the sequence. The compressed and selected branches and the selection run as `nsa` runs
  them, on the kernels too, with the query offset q0 of the shard against the gathered
  selected K/V and segment ids (4 bytes per token of the sequence, for the keys' documents);
  the window on its halo (`window_attention`).
  """
  gather = lambda x: lax.all_gather(x, AXIS, axis=1, tiled=True)
  k_all, v_all = gather(k_slc), gather(v_slc)
  ids = None if segment_ids is None else gather(segment_ids)
  impls = backends(q, k_cmp, v_cmp, k_all, v_all, k_win, v_win, config=config, impl=impl,
                   interpret=interpret, packed=ids is not None, offset=True)
  o_cmp, o_slc, block_idx = sparse_branches(
      q, k_cmp, v_cmp, k_all, v_all, impls=impls, config=config, scale=scale, impl=impl,
      interpret=interpret, segment_ids=ids, q_offset=lax.axis_index(AXIS) * q.shape[1])
  o_win = window_attention(q, k_win, v_win, segment_ids, config=config, scale=scale,
                           backend=impls["window_attention"], interpret=interpret,
                           num_shards=num_shards)
  o = mix(gates, o_cmp, o_slc, o_win)
  return (o, block_idx) if return_block_idx else o
