"""Selected-block attention in Pallas (paper §3.3.2, §3.4): one kernel in five files.

`wrapper.py`: the public entry `selected_attention`, its custom VJP and `unsupported`;
`tiles.py`: `Tiles` (what a caller may tune, `default_tiles`) and the static geometry of a
call; `plan.py`: index planning in XLA; `kernels.py`: the Pallas kernels and their
pallas_calls; `choice.py`: which tiling (query tiles or block-major) runs a call.
Design: docs/kernels.md#selected-attention. Reference: `nsa_jax.ops.selected`.
"""
from pallas_kernels.selected_attention.tiles import Tiles, default_tiles
from pallas_kernels.selected_attention.wrapper import selected_attention, unsupported

__all__ = ["Tiles", "default_tiles", "selected_attention", "unsupported"]
