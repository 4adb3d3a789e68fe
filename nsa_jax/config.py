"""Configuration of the NSA operator (paper §3.3, defaults of §4.1; SPEC §2)."""
from __future__ import annotations

import dataclasses

GROUP_SCORES = ("sum", "max")
SELECT_GATES = ("none", "straight_through")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Block sizes of Native Sparse Attention.

  Attributes:
    compress_block: l, tokens per compressed block (paper Eq. 7).
    compress_stride: d, stride between compressed blocks; divides l and l'.
    select_block: l', tokens per selection block (paper Eq. 9-11), l <= l'.
    num_selected: n, selected blocks per query, forced ones included (Eq. 11).
    num_initial: leading blocks always selected (paper §4.1: 1).
    num_local: most recent blocks always selected, the one holding t first
      (paper §4.1: 2).
    window: w, sliding-window length, the query itself included (§3.3.3).
    group_score: how the G query heads of a KV group share one block score:
      "sum" (paper Eq. 10) or "max" (the max over heads of each head's score);
      docs/selection_learning.md, "Group aggregation".
    select_gate: "none" (the paper) or "straight_through": the selected branch
      weights each selected block by a gate equal to 1 whose gradient reaches the
      block's importance score; docs/selection_learning.md, "Straight-through gate".
  """

  compress_block: int = 32
  compress_stride: int = 16
  select_block: int = 64
  num_selected: int = 16
  num_initial: int = 1
  num_local: int = 2
  window: int = 512
  group_score: str = "sum"
  select_gate: str = "none"

  def __post_init__(self):
    for name, choices in (("group_score", GROUP_SCORES), ("select_gate", SELECT_GATES)):
      value = getattr(self, name)
      if value not in choices:
        raise ValueError(f"NSAConfig.{name}={value!r} must be one of {choices}")
    for name in ("compress_block", "compress_stride", "select_block",
                 "num_selected", "window", "num_local"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"NSAConfig.{name}={value!r} must be an int >= 1")
    if not isinstance(self.num_initial, int) or self.num_initial < 0:
      raise ValueError(
          f"NSAConfig.num_initial={self.num_initial!r} must be an int >= 0")
    l, d, lp = self.compress_block, self.compress_stride, self.select_block
    if l % d:
      raise ValueError(
          f"compress_stride={d} must divide compress_block={l}")
    if lp % d:
      raise ValueError(
          f"compress_stride={d} must divide select_block={lp}")
    if l > lp:
      raise ValueError(
          f"compress_block={l} must be <= select_block={lp}")
    forced = self.num_initial + self.num_local
    if forced > self.num_selected:
      raise ValueError(
          f"num_initial={self.num_initial} + num_local={self.num_local} "
          f"= {forced} must be <= num_selected={self.num_selected}")

  def num_compressed(self, seq_len: int) -> int:
    """Tc = number of complete compressed blocks in `seq_len` tokens (SPEC §3)."""
    l, d = self.compress_block, self.compress_stride
    return max(0, (seq_len - l) // d + 1)

  def num_select_blocks(self, seq_len: int) -> int:
    """Number of selection blocks covering `seq_len` tokens (last may be partial)."""
    return -(-seq_len // self.select_block)
