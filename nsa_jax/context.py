"""The NSA op on a device mesh: `sharded_nsa`, split over batch rows, heads and context.

Context parallelism: every sequence split along T over the mesh axis "context" (issue #23).
Per-shard functions (`local_nsa`, `halo`), called under `jax.shard_map` over `CONTEXT`
(the wrappers: `sharded_nsa`, `with_halo`). Shard c of P holds the T / P tokens at
positions c*T/P .. of each row; it receives what crosses its boundary: halos (`halo`) for
the compression and the window, all-gathered compressed and selected keys and values and
segment ids, and runs its queries at their query offset (docs/semantics.md#context-parallelism). Gradients return through
the collectives' transposes, which jax derives.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, segments, window
from nsa_jax.ops.nsa import backends, check_inputs, mix, nsa, sparse_branches

AXES = ("data", "fsdp", "context", "heads")   # the mesh axes (docs/api.md#meshes)
BATCH_AXES = ("data", "fsdp")
CONTEXT = "context"


def halo(x, size: int, num_shards: int):
  """The `size` rows (axis 1) before this shard's first row: the last rows of the shards before
  it, zeros before the start of the sequence. Call under `shard_map` over `CONTEXT`; x is this
  shard's [B, Tl, ...]. A shard holding fewer than `size` rows passes on its predecessors'
  (ceil(size / Tl) hops, each a `ppermute` of only the rows it needs)."""
  Tl = x.shape[1]
  hops = -(-size // Tl)
  parts = []
  for h in range(hops, 0, -1):   # from the farthest shard back to the nearest
    rows = size - (hops - 1) * Tl if h == hops else Tl
    part = x[:, Tl - rows:]
    parts.append(lax.ppermute(part, CONTEXT, [(i, i + h) for i in range(num_shards - h)])
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
  first = lax.axis_index(CONTEXT) * q.shape[1]
  before_start = jnp.maximum(h - first, 0)      # halo rows at positions < 0
  def extend(x, front=None):
    front = halo(x, h, num_shards) if front is None else front
    return jnp.roll(jnp.concatenate([front, x], axis=1), -before_start, axis=1)
  q_ext = extend(q, jnp.zeros((q.shape[0], h) + q.shape[2:], q.dtype))
  doc_start, doc_end = segments.bounds(None if segment_ids is None else extend(segment_ids),
                                       q_ext.shape[1])
  o = window._window_attention(q_ext, extend(k), extend(v), config=config,
                               scale=_common.resolve_scale(scale, q), backend=backend,
                               interpret=interpret, doc_start=doc_start, doc_end=doc_end)
  return jnp.roll(o, before_start, axis=1)[:, h:]


def local_nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, segment_ids=None,
              config: NSAConfig, scale: float | None, impl: str, interpret: bool | None,
              return_block_idx: bool, num_shards: int):
  """`nsa_jax.ops.nsa.nsa` of one shard's queries, under `shard_map` over `CONTEXT` (module doc).

  q, k_slc, v_slc, k_win, v_win, gates, segment_ids (packed rows, or None): this shard's
  [B, Tl, ...] rows; k_cmp, v_cmp: all Tc = config.num_compressed(T) compressed blocks of
  the sequence. The compressed and selected branches and the selection run as `nsa` runs
  them, on the kernels too, with the query offset q0 of the shard against the gathered
  selected K/V and segment ids (4 bytes per token of the sequence, for the keys' documents);
  the window on its halo (`window_attention`).
  """
  gather = lambda x: lax.all_gather(x, CONTEXT, axis=1, tiled=True)
  k_all, v_all = gather(k_slc), gather(v_slc)
  ids = None if segment_ids is None else gather(segment_ids)
  impls = backends(q, k_cmp, v_cmp, k_all, v_all, k_win, v_win, config=config, impl=impl,
                   interpret=interpret, packed=ids is not None, offset=True)
  q0 = lax.axis_index(CONTEXT) * q.shape[1]
  doc_start, doc_end = segments.bounds(ids, q.shape[1], q0)
  o_cmp, o_slc, block_idx = sparse_branches(
      q, k_cmp, v_cmp, k_all, v_all, impls=impls, config=config, scale=scale,
      interpret=interpret, doc_start=doc_start, doc_end=doc_end, q_offset=q0)
  o_win = window_attention(q, k_win, v_win, segment_ids, config=config, scale=scale,
                           backend=impls["window_attention"], interpret=interpret,
                           num_shards=num_shards)
  o = mix(gates, o_cmp, o_slc, o_win)
  return (o, block_idx) if return_block_idx else o


@functools.lru_cache(maxsize=16)
def sharded_nsa(mesh: Mesh):
  """`nsa_jax.ops.nsa.nsa` under `jax.shard_map` over the axes of `mesh`.

  The inputs of length T and the output are split as P(("data", "fsdp"),
  "context", "heads", None): batch rows over data and fsdp, tokens over context,
  query heads and KV heads over heads (segment_ids [B, T] as P(("data", "fsdp"),
  "context")); k_cmp and v_cmp (Tc rows) are whole over context. Heads are grouped
  contiguously (query head h reads KV head h // G), so a contiguous slice of
  HQ / heads query heads reads exactly the slice of HKV / heads KV heads on the same
  device: each head and batch shard is an independent NSA problem, the custom VJPs
  of the kernels run per shard as well. With context > 1 the shards of one sequence
  exchange what their queries need (`nsa_jax.local_nsa`); T must then be a
  multiple of context.
  """
  spec = P(BATCH_AXES, CONTEXT, "heads", None)
  cmp_spec = P(BATCH_AXES, None, "heads", None)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  chunks, heads = mesh.shape[CONTEXT], mesh.shape["heads"]

  def op(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config,
         scale: float | None = None, impl: str = "auto", interpret: bool | None = None,
         return_block_idx: bool = False, segment_ids=None):
    args = [q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates]
    # validated here, before tracing: inside shard_map the arrays are traced
    check_inputs(*args, config=config, segment_ids=segment_ids)
    _common.check_impl(impl)
    B, T, HQ, HKV = q.shape[0], q.shape[1], q.shape[2], k_slc.shape[2]
    if B % rows or T % chunks or HQ % heads or HKV % heads:
      raise ValueError(f"sharded nsa: batch={B} must be a multiple of data*fsdp={rows}, "
                       f"T={T} of context={chunks}, num_heads={HQ} and num_kv_heads={HKV} "
                       f"of heads={heads}")
    kw = dict(config=config, scale=scale, impl=impl, interpret=interpret,
              return_block_idx=return_block_idx)
    whole = (functools.partial(nsa, **kw) if chunks == 1 else
             functools.partial(local_nsa, **kw, num_shards=chunks))
    local = lambda *a: whole(*a[:8], segment_ids=a[8] if len(a) > 8 else None)
    out_specs = (spec, spec) if return_block_idx else spec
    in_specs = [spec, cmp_spec, cmp_spec] + [spec] * 5
    if segment_ids is not None:
      args.append(segment_ids)
      in_specs.append(P(BATCH_AXES, CONTEXT))
    # check_vma=False: pallas_call has no replication rule. Inputs whole over an
    # axis (k_cmp, v_cmp over context) get their cotangents psum'd over it.
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=False)(*args)

  return op


def with_halo(fn, x, size: int, mesh: Mesh, *, heads: tuple[int, int] | None = None):
  """`fn([halo; x_c])` on each shard x_c of x [B, T, ...] (rows as `batch_sharding`),
  concatenated along axis 1: `fn` sees its shard's tokens after the `size` tokens before
  them (`halo`; zeros before the sequence). heads: (dimension of x, dimension of
  fn's output) split over "heads", if any. Under `jax.jit`."""
  def spec(dim):
    return P(BATCH_AXES, CONTEXT) if dim is None else P(
        BATCH_AXES, CONTEXT, *(None,) * (dim - 2), "heads")
  in_dim, out_dim = heads or (None, None)
  per_shard = lambda x: fn(jnp.concatenate([halo(x, size, mesh.shape[CONTEXT]), x],
                                           axis=1))
  return jax.shard_map(per_shard, mesh=mesh, in_specs=spec(in_dim), out_specs=spec(out_dim),
                       check_vma=False)(x)
