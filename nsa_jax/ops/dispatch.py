"""Which implementation runs each op (the `impl` argument): one table (docs/api.md#impl).

Every op has the reference "xla" and the Pallas kernels "pallas" (the distillation's
teacher, `distill_teacher`, among them); the window and compressed branches and the model's
dense attention (`nsa_jax.ops.dense`) also "cudnn". Each backend has one check,
`SUPPORTED[op][name](call)`, which reads shapes, dtypes, the config and the device (never
values) and returns why it cannot run the call, or None. `impl="auto"` takes the first
backend of `AUTO[op]` that runs the call on a GPU, the reference elsewhere; an explicit impl
that cannot run it raises a ValueError before anything is traced; `nsa(impl=...)` gives each
branch the backends `NSA_BRANCHES[impl]` lists. The selected branch with the straight-through
gate (a `block_bias` in its call) runs on the kernels' block-major tiling
(docs/selection_learning.md#straight-through-gate).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from nsa_jax.config import NSAConfig
from nsa_jax.ops import _common, cudnn
from pallas_kernels import (block_lse, compressed_attention, decode_attention, select_blocks,
                            selected_attention, window_attention)


@dataclasses.dataclass(frozen=True)
class Call:
  """What a support check reads of one call: the op's arrays (by name, in the op's
  order), the config, the `interpret` argument, whether the rows are packed
  (segment ids given) and whether the queries are a slice at a query offset
  (`q_offset`, context parallelism: `nsa_jax.context`)."""

  arrays: dict[str, Any]
  config: NSAConfig
  interpret: bool | None
  packed: bool = False
  offset: bool = False

  def describe(self) -> str:
    arrays = ", ".join(f"{name} {list(x.shape)} {x.dtype}" for name, x in self.arrays.items())
    return arrays + (", segment_ids" if self.packed else "") + (
        ", q_offset" if self.offset else "")


def _reference(call: Call) -> str | None:
  return None


def _cudnn_runs(q, v, interpret: bool | None) -> str | None:
  if cudnn.cudnn_runs(q, v, interpret):
    return None
  return (f"cuDNN's fused attention needs a GPU backend (have {jax.default_backend()}), "
          f"16-bit inputs, Dk a multiple of 8, Dv <= Dk <= 128 (256 from Hopper on), "
          f"interpret={interpret} not True and one KV group of one batch row of its call "
          f"under 2^31 elements (`cudnn.call_plan`)")


def _cudnn_masks(call: Call) -> str | None:
  """Packed rows and query offsets: the calls here take no document mask and start
  their causal mask at the first query. cuDNN's fused attention has packed layouts
  (`jax._src.cudnn.fused_attention_stablehlo`: q_offsets, kv_offsets), but not with
  the sliding window or the compressed branch's fold, and nothing here proves them
  right (no GPU check of them): the Pallas kernels, whose loops skip other documents
  and take a query offset, run these."""
  if call.packed:
    return ("segment_ids (packed rows) are not taken by the cuDNN calls: the Pallas "
            "kernels run them")
  if call.offset:
    return ("a query offset (context parallelism) is not taken by the cuDNN calls: "
            "their causal mask starts at the first query; the Pallas kernels run it")
  return None


def _cudnn_direct(call: Call) -> str | None:
  """cuDNN over the call's own q and v: the window branch, dense attention."""
  a = call.arrays
  return _cudnn_masks(call) or _cudnn_runs(a["q"], a["v"], call.interpret)


def _cudnn_compressed(call: Call) -> str | None:
  """cuDNN runs the compressed branch over q folded by stride residue
  (`compressed.compressed_attention_folded`): [B*d, ceil(T/d), HQ, Dk]."""
  if why := _cudnn_masks(call):
    return why
  q, d = call.arrays["q"], call.config.compress_stride
  B, T, HQ, Dk = q.shape
  folded = jax.ShapeDtypeStruct((B * d, -(-T // d), HQ, Dk), q.dtype)
  return _cudnn_runs(folded, call.arrays["v_cmp"], call.interpret)


def _on_pallas(kernel_check: Callable[[Call], str | None]):
  """A Pallas backend's check: a GPU or interpret mode, then the kernel's own."""
  def check(call: Call) -> str | None:
    if call.interpret is False and jax.default_backend() != "gpu":
      return (f"the Pallas kernels need a GPU backend (have {jax.default_backend()}) "
              f"or interpret mode (interpret=False)")
    return kernel_check(call)
  return check


def _pallas_window(call: Call) -> str | None:
  return window_attention.unsupported(*call.arrays.values(), window=call.config.window)


def _pallas_compressed(call: Call) -> str | None:
  return compressed_attention.unsupported(*call.arrays.values())


def _pallas_select(call: Call) -> str | None:
  a = call.arrays
  return select_blocks.unsupported(a["q"], a["k_cmp"],
                                   sizes=_common.selection_sizes(call.config))


def _pallas_selected(call: Call) -> str | None:
  a = call.arrays
  return selected_attention.unsupported(a["q"], a["k"], a["v"],
                                        block=call.config.select_block,
                                        biased="block_bias" in a)


def _pallas_teacher(call: Call) -> str | None:
  a = call.arrays
  return block_lse.unsupported(a["q"], a["k"], block=call.config.select_block)


def _pallas_decode(call: Call) -> str | None:
  return decode_attention.unsupported(*call.arrays.values(),
                                      sizes=_common.selection_sizes(call.config))


SUPPORTED: dict[str, dict[str, Callable[[Call], str | None]]] = {
    "compressed_attention": {"cudnn": _cudnn_compressed,
                             "pallas": _on_pallas(_pallas_compressed), "xla": _reference},
    "window_attention": {"cudnn": _cudnn_direct, "pallas": _on_pallas(_pallas_window),
                         "xla": _reference},
    # The compressed kernel over one-token blocks (`dense.TOKEN_BLOCKS`).
    "dense_attention": {"cudnn": _cudnn_direct, "pallas": _on_pallas(_pallas_compressed),
                        "xla": _reference},
    "select_blocks": {"pallas": _on_pallas(_pallas_select), "xla": _reference},
    "selected_attention": {"pallas": _on_pallas(_pallas_selected), "xla": _reference},
    "nsa_decode": {"pallas": _on_pallas(_pallas_decode), "xla": _reference},
    # The selection distillation's teacher (`nsa_jax.ops.distill.block_teacher`).
    "distill_teacher": {"pallas": _on_pallas(_pallas_teacher), "xla": _reference},
}

# impl="auto" on a GPU, first supported first. The compressed op alone keeps cuDNN
# out: its lse carries no gradient there, and the op returns lse (`nsa` needs none:
# NSA_BRANCHES). Off a GPU "auto" is the reference.
AUTO: dict[str, tuple[str, ...]] = {
    "compressed_attention": ("pallas", "xla"),
    "window_attention": ("cudnn", "pallas", "xla"),
    "dense_attention": ("cudnn", "pallas", "xla"),
    "select_blocks": ("pallas", "xla"),
    "selected_attention": ("pallas", "xla"),
    "nsa_decode": ("pallas", "xla"),
    "distill_teacher": ("pallas", "xla"),
}

# nsa(impl=...) -> the backends of each branch, first supported first. "pallas" means
# the GPU kernels: cuDNN for the window and compressed branches where it takes them
# (faster there; the selection needs no gradient of the compressed lse).
_GPU_BRANCHES = {"compressed_attention": ("cudnn", "pallas"),
                 "window_attention": ("cudnn", "pallas"),
                 "select_blocks": ("pallas",), "selected_attention": ("pallas",)}
NSA_BRANCHES: dict[str, dict[str, tuple[str, ...]]] = {
    "pallas": _GPU_BRANCHES,
    "auto": {op: order + ("xla",) for op, order in _GPU_BRANCHES.items()},
    "xla": {op: ("xla",) for op in _GPU_BRANCHES},
}


def impls(op: str) -> tuple[str, ...]:
  """The impl values `op` takes."""
  return ("auto",) + tuple(SUPPORTED[op])


def choose(op: str, impl: str, call: Call, order: tuple[str, ...] | None = None) -> str:
  """The backend that runs `call` of `op` (see the module docstring).

  order: the backends to try, first supported first; default: `AUTO[op]` on a GPU
  (the reference elsewhere) for impl="auto", else `(impl,)`.
  """
  _common.check_impl(impl, impls(op))
  if order is None:
    on_gpu = jax.default_backend() == "gpu"
    order = (AUTO[op] if on_gpu else ("xla",)) if impl == "auto" else (impl,)
  reasons = []
  for name in order:
    why = SUPPORTED[op][name](call)
    if why is None:
      return name
    reasons.append(f"{name}: {why}")
  raise ValueError(f"{op}(impl={impl!r}) cannot run {call.describe()}: "
                   + "; ".join(reasons) + " (impl='xla' runs any input)")


def nsa_branches(impl: str, calls: dict[str, Call]) -> dict[str, str]:
  """The backend of each branch of `nsa(impl=impl)`; calls: {branch op: its Call}."""
  _common.check_impl(impl)
  if impl == "auto" and jax.default_backend() != "gpu":
    impl = "xla"
  return {op: choose(op, impl, call, NSA_BRANCHES[impl][op]) for op, call in calls.items()}
