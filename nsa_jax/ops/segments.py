"""Packed rows (SPEC §6): documents of a row from its segment ids.

A row of `segment_ids: [B, T] int32` holds several documents, each one contiguous
run of equal ids, each starting at a multiple of A = `select_block` (the data
pipeline pads every document up to the next multiple with tokens of its own id).
The ops, the kernels and the module read the documents as positions, derived once
here in XLA: `document_starts` (s(t), the first position of t's document) and
`document_ends` (one past its last). Packing is invisible: every query sees what it
would see were its document a sequence of its own starting at position 0.

`check_segment_ids` validates concrete ids before anything is traced; under `jit`
the ids are abstract and their alignment is the caller's contract.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_segment_ids(segment_ids, q, align: int) -> None:
  """Raises a ValueError for segment_ids that are not [B, T] integers of q [B, T, ...],
  or, when concrete, whose documents are not contiguous runs starting at multiples of
  `align` (SPEC §6; `align` is the config's select_block)."""
  B, T = q.shape[:2]
  shape = getattr(segment_ids, "shape", None)
  if shape != (B, T):
    raise ValueError(f"segment_ids.shape={shape} must be [B, T]={(B, T)} of "
                     f"q.shape={q.shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids.dtype={segment_ids.dtype} must be an integer type")
  if isinstance(segment_ids, jax.core.Tracer):
    return   # under jit: the caller's contract (module doc)
  ids = np.asarray(segment_ids)
  for b, row in enumerate(ids):
    starts = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))
    run_ids = row[starts]
    values, first, counts = np.unique(run_ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
      i = int(np.argmax(counts > 1))
      again = starts[np.flatnonzero(run_ids == values[i])]
      raise ValueError(
          f"segment_ids row {b}: id {values[i]} forms {counts[i]} separate runs (starting at "
          f"positions {again[:4].tolist()}): a document must be one contiguous run (SPEC §6)")
    bad = starts[starts % align != 0]
    if bad.size:
      raise ValueError(
          f"segment_ids row {b}: the document of id {row[bad[0]]} starts at position "
          f"{bad[0]}, not a multiple of select_block={align}; documents must start at "
          f"multiples of select_block (SPEC §6: pad each document with tokens of its own id, "
          f"as `nsa_jax.data.pack_documents` does)")


def document_starts(segment_ids):
  """s(t): [B, T] int32, the first position of the document holding t."""
  T = segment_ids.shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return lax.cummax(jnp.where(first, t, 0), axis=1)


def document_ends(segment_ids):
  """[B, T] int32: one past the last position of the document holding t."""
  T = segment_ids.shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  last = jnp.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1],
                          jnp.ones_like(segment_ids[:, :1], dtype=bool)], axis=1)
  return lax.cummin(jnp.where(last, t + 1, T), axis=1, reverse=True)


def positions_in_documents(segment_ids):
  """[B, T] int32: t - s(t), each token's position inside its document (RoPE's, SPEC §6)."""
  return jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :] - document_starts(
      segment_ids)
