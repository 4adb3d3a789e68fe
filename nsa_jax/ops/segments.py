"""Packed rows (docs/semantics.md#packed-rows): documents of a row from its segment ids.

A row of `segment_ids: [B, T] int32` holds several documents, each one contiguous
run of equal ids, each starting at a multiple of A = `select_block` (the data
pipeline pads every document up to the next multiple with tokens of its own id).
The ops, the kernels and the module read the documents as positions, derived once here
in XLA: `document_starts` (s(t), the first position of t's document) and `document_ends`
(one past its last); `bounds` gives both, `documents` checks the ids first. Packing is
invisible: every query sees what it would see were its document a sequence of its
own starting at position 0.

`check_segment_ids` validates concrete ids before anything is traced; under `jit`
the ids are abstract and their alignment is the caller's contract. `Alone` runs the
documents of concrete packed rows each on its own, for the tests of that contract
(tests/test_packed.py, experiments/gpu_check.py --packed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_segment_ids(segment_ids, q, align: int, sliced: bool = False) -> None:
  """Raises a ValueError for segment_ids that are not [B, T] integers of q [B, T, ...]
  (sliced: [B, S >= T], the rows of a sequence q holds a slice of the queries of:
  `documents`), or, when concrete, whose documents are not contiguous runs starting
  at multiples of `align` (the config's select_block)."""
  B, T = q.shape[:2]
  shape = getattr(segment_ids, "shape", None)
  if sliced and shape is not None and len(shape) == 2 and shape[0] == B and shape[1] >= T:
    T = shape[1]
  if shape != (B, T):
    raise ValueError(f"segment_ids.shape={shape} must be [B, T]={(B, T)} of "
                     f"q.shape={q.shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids.dtype={segment_ids.dtype} must be an integer type")
  if isinstance(segment_ids, jax.core.Tracer):
    return   # under jit: the caller's contract (module doc)
  ids = np.asarray(segment_ids)
  for b, row in enumerate(ids):
    starts = _run_starts(row)
    run_ids = row[starts]
    values, counts = np.unique(run_ids, return_counts=True)
    if np.any(counts > 1):
      i = int(np.argmax(counts > 1))
      again = starts[np.flatnonzero(run_ids == values[i])]
      raise ValueError(
          f"segment_ids row {b}: id {values[i]} forms {counts[i]} separate runs (starting at "
          f"positions {again[:4].tolist()}): a document must be one contiguous run "
          f"(docs/semantics.md#packed-rows)")
    bad = starts[starts % align != 0]
    if bad.size:
      raise ValueError(
          f"segment_ids row {b}: the document of id {row[bad[0]]} starts at position "
          f"{bad[0]}, not a multiple of select_block={align}; documents must start at "
          f"multiples of select_block (pad each document with tokens of its own id, "
          f"as `nsa_jax.data.pack_documents` does)")


def _run_starts(row):
  """Positions where a run of equal ids starts in one row (numpy)."""
  return np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))


def document_starts(segment_ids):
  """s(t): [B, T] int32, the first position of the document holding t."""
  T = segment_ids.shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return lax.cummax(jnp.where(first, t, 0), axis=1)


def documents(segment_ids, q, align: int, q_offset=None):
  """`bounds` of packed rows, checked first (`check_segment_ids`): what an op's public
  function derives; `nsa` checks once and derives once for all its branches."""
  if segment_ids is not None:
    check_segment_ids(segment_ids, q, align, sliced=q_offset is not None)
  return bounds(segment_ids, q.shape[1], q_offset)


def bounds(segment_ids, num_queries: int, q_offset=None):
  """(s(t) [B, T] of the T = num_queries queries, document ends [B, S] of the keys) of
  packed rows segment_ids [B, S], unchecked; (None, None) where segment_ids is None.
  q_offset (context parallelism, `nsa_jax.context`; may be traced): the queries are
  those at positions q_offset .. q_offset + T - 1 of the rows."""
  if segment_ids is None:
    return None, None
  starts = document_starts(segment_ids)
  if q_offset is not None:
    starts = lax.dynamic_slice_in_dim(starts, q_offset, num_queries, axis=1)
  return starts, document_ends(segment_ids)


def document_ends(segment_ids):
  """[B, T] int32: one past the last position of the document holding t."""
  T = segment_ids.shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  last = jnp.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1],
                          jnp.ones_like(segment_ids[:, :1], dtype=bool)], axis=1)
  return lax.cummin(jnp.where(last, t + 1, T), axis=1, reverse=True)


def positions_in_documents(segment_ids):
  """[B, T] int32: t - s(t), each token's position inside its document (RoPE's)."""
  return jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :] - document_starts(
      segment_ids)


class Alone:
  """The documents of concrete packed rows, each alone: a batch row of its own from
  position 0, padded at its end to the longest (packing is invisible, so each
  document's results there equal its rows' in the packed run; what follows a document
  changes none of its rows under causal attention).

  A document at tokens [s, e) of row b holds the compressed blocks that start in it
  and end before e, s/d .. s/d + Tc(e - s) - 1 (`blocks=True`), and the selection
  blocks from s/l'. Maps arrays either way, under jit too (the layout is static);
  concrete arrays are mapped on the host (numpy), with no XLA program per slice.
  """

  def __init__(self, segment_ids, config):
    ids = np.asarray(segment_ids)
    self.config = config
    self.shape = ids.shape
    self.runs = [(b, int(s), int(e)) for b, row in enumerate(ids)
                 for s, e in zip(_run_starts(row), list(_run_starts(row)[1:]) + [len(row)])]
    self.length = max(e - s for _, s, e in self.runs)

  def _span(self, s: int, e: int, blocks: bool) -> tuple[int, int]:
    """(first index, count) of a document's tokens or compressed blocks."""
    if blocks:
      return s // self.config.compress_stride, self.config.num_compressed(e - s)
    return s, e - s

  def alone(self, x, *, blocks: bool = False, fill=0):
    """[B, N, ...] packed rows -> [D, N_alone, ...], one document per row."""
    xp, x = _array_module(x)
    size = self.config.num_compressed(self.length) if blocks else self.length
    pieces = []
    for b, s, e in self.runs:
      lo, n = self._span(s, e, blocks)
      pad = [(0, size - n)] + [(0, 0)] * (x.ndim - 2)
      pieces.append(xp.pad(x[b, lo:lo + n], pad, constant_values=fill))
    return jnp.asarray(xp.stack(pieces))

  def packed(self, y, shape, *, blocks: bool = False):
    """[D, N_alone, ...] results alone -> packed rows of `shape` ([B, N, ...]), zero
    where no document has an entry (compressed blocks across a boundary)."""
    xp, y = _array_module(y)
    out = xp.zeros(shape, y.dtype)
    for i, (b, s, e) in enumerate(self.runs):
      lo, n = self._span(s, e, blocks)
      out = _set(out, (b, slice(lo, lo + n)), y[i, :n])
    return jnp.asarray(out)

  def alone_selection(self, block_idx):
    """Packed block indices [B, T, HKV, n] -> each document's: shifted by s/l', blocks
    before the document -1 (so are the padded rows)."""
    xp, block_idx = _array_module(block_idx)
    lp = self.config.select_block
    shifted = xp.stack([
        xp.pad(xp.where(block_idx[b, s:e] * lp >= s, block_idx[b, s:e] - s // lp, -1),
               [(0, self.length - (e - s)), (0, 0), (0, 0)], constant_values=-1)
        for b, s, e in self.runs])
    return jnp.asarray(shifted.astype(block_idx.dtype))

  def packed_selection(self, block_idx):
    """Block indices of the documents alone [D, L, HKV, n] -> of the packed rows
    [B, T, HKV, n]: shifted by s/l'."""
    xp, block_idx = _array_module(block_idx)
    lp = self.config.select_block
    out = xp.full(self.shape + block_idx.shape[2:], -1, block_idx.dtype)
    for i, (b, s, e) in enumerate(self.runs):
      x = block_idx[i, :e - s]
      out = _set(out, (b, slice(s, e)), xp.where(x >= 0, x + s // lp, -1))
    return jnp.asarray(out)

  def valid(self):
    """[D, N_alone] bool: the rows of the documents alone that are not padding."""
    lengths = np.array([e - s for _, s, e in self.runs])
    return jnp.asarray(np.arange(self.length)[None, :] < lengths[:, None])


def _array_module(x):
  """(numpy, x on the host) for a concrete array, (jax.numpy, x) for a tracer: `Alone`
  maps concrete arrays on the host, where each slice is not an XLA program of its own."""
  return (jnp, x) if isinstance(x, jax.core.Tracer) else (np, np.asarray(x))


def _set(out, index, value):
  """`out` with out[index] = value: in place on the host, `.at[].set` under jit."""
  if isinstance(out, np.ndarray):
    out[index] = value
    return out
  return out.at[index].set(value)
