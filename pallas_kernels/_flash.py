"""Banded flash attention: the Pallas kernel shared by the window and compressed branches.

Key j sits at position j * stride + offset and query t sees it iff
t - window < pos(j) <= t (`Band`): the window branch is stride 1, offset 0, window w; the
compressed branch stride d, offset l - 1, no window. Each query tile loops only over the
key tiles its band reaches. Forward: online softmax in float32, o and lse; backward
(`jax.custom_vjp`): a dq kernel per query tile and a dk/dv kernel per key tile, a cotangent
on lse folded into delta. Packed rows (`Documents`) and a query offset narrow the loops.
This file: the pallas_calls and the custom VJP; the kernels: `_flash_kernels.py`.
Design: docs/kernels.md#banded-flash-attention; tiles: `pallas_kernels/_flash_tiles.py`.
Pure-JAX references: nsa_jax/ops/window.py, nsa_jax/ops/compressed.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _util
from pallas_kernels._flash_kernels import (LOG2E, Band, Documents, Inputs, Shapes, dkv_kernel,
                                           dq_kernel, fwd_kernel, query_tile)
from pallas_kernels._flash_tiles import Tiles

# ------------------------------------------------------------- pallas calls


def _shapes(q, k, v, tiles: Tiles, backward: bool, interpret: bool) -> Shapes:
  B, T, HQ, Dk = q.shape
  S, HKV, Dv = k.shape[1], k.shape[2], v.shape[-1]
  return Shapes(B=B, T=T, S=S, HKV=HKV, G=HQ // HKV, Dk=Dk, Dv=Dv,
                block_m=tiles.bwd_block_m if backward else tiles.block_m,
                block_k=tiles.bwd_block_k if backward else tiles.block_k,
                interpret=interpret)


def _pad_inputs(q, k, v, sh: Shapes):
  """q -> [B, Tp, HKV, Gp, Dkp]; k, v -> [B, Sp, HKV, Dkp / Dvp], zero padded."""
  qg = q.reshape(sh.B, sh.T, sh.HKV, sh.G, sh.Dk)
  return (_util.pad_to(qg, (sh.B, sh.Tp, sh.HKV, sh.Gp, sh.Dkp)),
          _util.pad_to(k, (sh.B, sh.Sp, sh.HKV, sh.Dkp)),
          _util.pad_to(v, (sh.B, sh.Sp, sh.HKV, sh.Dvp)))


def _row_spec(sh: Shapes, *, dim: int | None, reverse: bool | None = None):
  """BlockSpec of a packed-row array [B, Tp, HKV, Gp(, dim)], grid (., HKV, B).

  reverse=None: all of T; else the query tile of program_id(0).
  """
  rows = sh.Tp if reverse is None else sh.Bq
  tail = () if dim is None else (dim,)

  def index(i, h, b):
    tile = 0 if reverse is None else query_tile(i, sh, reverse)
    return (b, tile, h, 0) + (0,) * len(tail)

  return pl.BlockSpec((None, rows, None, sh.Gp) + tail, index)


def _key_spec(sh: Shapes, dim: int, *, whole: bool):
  """BlockSpec of a key array [B, Sp, HKV, D]: all keys, or key tile program_id(0)."""
  if whole:
    return pl.BlockSpec((None, sh.Sp, None, dim), lambda i, h, b: (b, 0, h, 0))
  return pl.BlockSpec((None, sh.block_k, None, dim), lambda i, h, b: (b, i, h, 0))


def _optional_inputs(docs: Documents | None, q_offset, sh: Shapes, *,
                     reverse: bool | None, ends: bool = False):
  """(arrays, BlockSpecs) of the optional inputs, grid (., HKV, B): each query's
  document start [B, Tp] (its tile's, or all of them where reverse=None), each key's
  document end [B, Sp] (key tile program_id(0); where `ends`) and the query offset
  [1]. Padded rows and keys repeat the last real one's (edge padding)."""
  arrays, specs = [], []
  if docs is not None:
    arrays.append(jnp.pad(docs.query_start.astype(jnp.int32),
                          [(0, 0), (0, sh.Tp - sh.T)], mode="edge"))
    rows = sh.Tp if reverse is None else sh.Bq
    specs.append(pl.BlockSpec((None, rows), lambda i, h, b: (
        b, 0 if reverse is None else query_tile(i, sh, reverse))))
    if ends:
      arrays.append(jnp.pad(docs.key_end.astype(jnp.int32),
                            [(0, 0), (0, sh.Sp - sh.S)], mode="edge"))
      specs.append(pl.BlockSpec((None, sh.block_k), lambda i, h, b: (b, i)))
  if q_offset is not None:
    arrays.append(jnp.reshape(q_offset, (1,)).astype(jnp.int32))
    specs.append(pl.BlockSpec((1,), lambda i, h, b: (0,)))
  return arrays, specs


def _fwd_call(qp, kp, vp, docs, q_offset, *, band, sh, scale, tiles, interpret, reverse):
  grid = (sh.num_q_tiles, sh.HKV, sh.B)
  extra, extra_specs = _optional_inputs(docs, q_offset, sh, reverse=reverse)
  inputs = Inputs(docs=docs is not None, offset=q_offset is not None)
  return pl.pallas_call(
      functools.partial(fwd_kernel, band=band, sh=sh, scale=scale,
                        reverse=reverse, inputs=inputs),
      grid=grid,
      in_specs=[_row_spec(sh, dim=sh.Dkp, reverse=reverse),
                _key_spec(sh, sh.Dkp, whole=True),
                _key_spec(sh, sh.Dvp, whole=True)] + extra_specs,
      out_specs=[_row_spec(sh, dim=sh.Dvp, reverse=reverse),
                 _row_spec(sh, dim=None, reverse=reverse)],
      out_shape=[jax.ShapeDtypeStruct((sh.B, sh.Tp, sh.HKV, sh.Gp, sh.Dvp),
                                      qp.dtype),
                 jax.ShapeDtypeStruct((sh.B, sh.Tp, sh.HKV, sh.Gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret, name="banded_flash_fwd")(qp, kp, vp, *extra)


def _bwd_calls(qp, kp, vp, dop, lse2, delta, docs, q_offset, *, band, sh, scale, tiles,
               interpret, reverse):
  """Returns padded (dq, dk, dv)."""
  params = plgpu.CompilerParams(num_warps=tiles.bwd_num_warps,
                                num_stages=tiles.bwd_num_stages)
  inputs = Inputs(docs=docs is not None, offset=q_offset is not None)
  tile_rows = functools.partial(_row_spec, sh, reverse=reverse)
  extra, extra_specs = _optional_inputs(docs, q_offset, sh, reverse=reverse)
  dq = pl.pallas_call(
      functools.partial(dq_kernel, band=band, sh=sh, scale=scale,
                        reverse=reverse, inputs=inputs),
      grid=(sh.num_q_tiles, sh.HKV, sh.B),
      in_specs=[tile_rows(dim=sh.Dkp), _key_spec(sh, sh.Dkp, whole=True),
                _key_spec(sh, sh.Dvp, whole=True), tile_rows(dim=sh.Dvp),
                tile_rows(dim=None), tile_rows(dim=None)] + extra_specs,
      out_specs=tile_rows(dim=sh.Dkp),
      out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
      compiler_params=params, interpret=interpret,
      name="banded_flash_dq")(qp, kp, vp, dop, lse2, delta, *extra)

  # dk/dv: grid (key tile, KV head, batch * splits); split s of batch b sums
  # the query tiles of chunk s into partial [splits, B, Sp, HKV, D].
  splits = tiles.dkv_splits
  acc_dtype = jnp.float32 if splits > 1 else kp.dtype

  def unsplit(spec):
    return pl.BlockSpec(spec.block_shape,
                        lambda i, h, bs: spec.index_map(i, h, bs // splits))

  def part_spec(dim):
    return pl.BlockSpec((None, None, sh.block_k, None, dim),
                        lambda i, h, bs: (bs % splits, bs // splits, i, h, 0))

  all_rows = functools.partial(_row_spec, sh)
  extra, extra_specs = _optional_inputs(docs, q_offset, sh, reverse=None, ends=True)
  dk, dv = pl.pallas_call(
      functools.partial(dkv_kernel, band=band, sh=sh, scale=scale,
                        splits=splits, inputs=inputs),
      grid=(sh.num_k_tiles, sh.HKV, sh.B * splits),
      in_specs=[unsplit(all_rows(dim=sh.Dkp)),
                unsplit(_key_spec(sh, sh.Dkp, whole=False)),
                unsplit(_key_spec(sh, sh.Dvp, whole=False)),
                unsplit(all_rows(dim=sh.Dvp)),
                unsplit(all_rows(dim=None)), unsplit(all_rows(dim=None))]
               + [unsplit(spec) for spec in extra_specs],
      out_specs=[part_spec(sh.Dkp), part_spec(sh.Dvp)],
      out_shape=[jax.ShapeDtypeStruct((splits,) + kp.shape, acc_dtype),
                 jax.ShapeDtypeStruct((splits,) + vp.shape, acc_dtype)],
      compiler_params=params, interpret=interpret,
      name="banded_flash_dkv")(qp, kp, vp, dop, lse2, delta, *extra)
  return dq, dk.sum(0).astype(kp.dtype), dv.sum(0).astype(vp.dtype)


# ---------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def banded_attention(q, k, v, docs: Documents | None, q_offset, band: Band, scale: float,
                     tiles: Tiles, interpret: bool):
  """Softmax attention of q [B,T,HQ,Dk] over k, v [B,S,HKV,Dk/Dv] under `band`.

  docs: packed rows (`Documents`), or None for one document per row.
  q_offset: int32 scalar position of query row 0 (traced, e.g. under shard_map for
    context parallelism; keys start at position 0), or None for 0.

  Returns (o [B, T, HQ, Dv] in q.dtype, lse [B, T, HQ] float32); rows that
  see no key get o = 0 and lse = -inf, with zero gradients.
  """
  return _forward(q, k, v, docs, q_offset, band, scale, tiles, interpret)[0]


def _forward(q, k, v, docs, q_offset, band, scale, tiles, interpret):
  sh = _shapes(q, k, v, tiles, backward=False, interpret=interpret)
  qp, kp, vp = _pad_inputs(q, k, v, sh)
  o, lse = _fwd_call(qp, kp, vp, docs, q_offset, band=band, sh=sh, scale=scale, tiles=tiles,
                     interpret=interpret, reverse=band.window is None)
  HQ = sh.HKV * sh.G
  o = o[:, :sh.T, :, :sh.G, :sh.Dv].reshape(sh.B, sh.T, HQ, sh.Dv)
  lse = lse[:, :sh.T, :, :sh.G].reshape(sh.B, sh.T, HQ)
  return (o, lse), (q, k, v, docs, q_offset, o, lse)


def _backward(band, scale, tiles, interpret, res, cts):
  q, k, v, docs, q_offset, o, lse = res
  do, dlse = cts
  sh = _shapes(q, k, v, tiles, backward=True, interpret=interpret)
  qp, kp, vp = _pad_inputs(q, k, v, sh)
  rows = (sh.B, sh.T, sh.HKV, sh.G)
  padded_rows = (sh.B, sh.Tp, sh.HKV, sh.Gp)
  dop = _util.pad_to(do.reshape(rows + (sh.Dv,)), padded_rows + (sh.Dvp,))
  delta = (jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
           - dlse.astype(jnp.float32))
  delta = _util.pad_to(delta.reshape(rows), padded_rows)
  # Padded rows get lse = +inf, hence p = 0.
  lse2 = jnp.pad(lse.reshape(rows) * LOG2E,
                 [(0, n - m) for m, n in zip(rows, padded_rows)],
                 constant_values=jnp.inf)
  dq, dk, dv = _bwd_calls(qp, kp, vp, dop, lse2, delta, docs, q_offset, band=band, sh=sh,
                          scale=scale, tiles=tiles, interpret=interpret,
                          reverse=band.window is None)
  HQ = sh.HKV * sh.G
  return (dq[:, :sh.T, :, :sh.G, :sh.Dk].reshape(sh.B, sh.T, HQ, sh.Dk),
          dk[:, :sh.S, :, :sh.Dk], dv[:, :sh.S, :, :sh.Dv], None, None)


banded_attention.defvjp(_forward, _backward)
