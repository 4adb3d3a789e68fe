"""How alike a trained NSA model's neighbouring tokens choose blocks, and the selected kernel's speed then.

    PYTHONPATH=. python experiments/trained_selections.py --run runs/gpu-compare   # on a GPU
    PYTHONPATH=. python experiments/trained_selections.py --small                  # CPU smoke test

The SPEC §5 benchmark draws random q, so neighbouring tokens choose unrelated
blocks: a query tile of Bq tokens then reads ~Bq x n distinct blocks, and the
selected kernel runs one token per tile, bound by loading each token's n blocks
on their own (PERF_NOTES). A trained model's queries change slowly along the
sequence, so neighbours may choose alike, which the wide query tiles exploit
(paper §3.4). This script measures that on real text:

1. Selections. One validation text sequence per length goes through the
   trained model; the hook of `Transformer.__call__` records every layer's
   block_idx (`nsa_jax.select_blocks` on the layer's own q and compressed
   keys). For tiles of Bq = 1, 2, 4, 8 consecutive tokens: the mean number of
   distinct blocks per token, per layer, against block_idx from random normal
   q and compressed keys of the same shapes. Lengths above the training
   length are extrapolated (RoPE positions never seen in training).
2. Kernel (GPU only). `selected_attention` at Config A (B=1, HQ=64, HKV=4,
   Dk=Dv=128, bf16, random q, k, v: the kernel's work depends only on
   block_idx) with block_idx taken from 4 (layer, KV head) pairs of the model
   in place of the random one: forward and forward+backward, median of >= 10
   runs, and the tiling it chose per call (`tilings`: narrow, wide or
   block-major).

Writes trained_selections.json and .png to --out (default $OUT or
experiments/results) and prints a table.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bench_common
import nsa_jax
from check_selected import fwd_bwd, kernel_fn, mean_union_sizes
from nsa_jax import data
from nsa_jax.train_config import make_config
from nsa_jax.train_lib import load_model
from nsa_jax.model import Transformer
from pallas_kernels.selected_attention import default_tiles, tilings

TILE_TOKENS = (1, 2, 4, 8)
CONFIG_A = dict(HQ=64, HKV=4, D=128)


def layer_selections(model: Transformer, tokens) -> np.ndarray:
  """block_idx of every NSA layer on tokens [B, T]: [L, B, T, HKV, n]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    found = []

    def attend(i, attn, h):
      inputs = attn.branch_inputs(h)
      found.append(nsa_jax.select_blocks(inputs["q"], inputs["k_cmp"], config=attn.config,
                                         impl=attn.impl))
      return attn(h)

    nnx.merge(graphdef, state)(tokens, attend)
    return jnp.stack(found)

  return np.asarray(run(state, tokens))


def random_block_idx(T: int, HQ: int, HKV: int, D: int, config, dtype) -> np.ndarray:
  """block_idx [1, T, HKV, n] of random normal q and compressed keys."""
  kq, kk = jax.random.split(jax.random.key(T))
  q = jax.random.normal(kq, (1, T, HQ, D), dtype)
  k_cmp = jax.random.normal(kk, (1, config.num_compressed(T), HKV, D), dtype)
  return np.asarray(jax.jit(lambda q, k: nsa_jax.select_blocks(q, k, config=config))(q, k_cmp))


def blocks_per_token(block_idx: np.ndarray) -> dict[int, float]:
  """Mean distinct blocks per token over tiles of Bq tokens (what a tile reads, per token)."""
  return {bq: u / bq for bq, u in mean_union_sizes(block_idx, TILE_TOKENS).items()}


def config_a_block_idx(layers: np.ndarray) -> np.ndarray:
  """[1, T, 4, n] block_idx of Config A's 4 KV heads from the first 4 (layer, KV head) pairs."""
  L, B, T, HKV, n = layers.shape
  pairs = np.moveaxis(layers[:, 0], 2, 1).reshape(L * HKV, T, n)     # [(layer, head), T, n]
  if len(pairs) < CONFIG_A["HKV"]:
    pairs = np.concatenate([pairs] * -(-CONFIG_A["HKV"] // len(pairs)))
  return np.moveaxis(pairs[:CONFIG_A["HKV"]], 0, 1)[None]


def time_kernel(block_idx: np.ndarray, config, runs: int) -> dict:
  """Config A selected attention with this block_idx: ms fwd, fwd+bwd, chosen tiling."""
  T, HQ, HKV, D = block_idx.shape[1], CONFIG_A["HQ"], CONFIG_A["HKV"], CONFIG_A["D"]
  ks = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(ks[0], (1, T, HQ, D), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, HKV, D), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, T, HKV, D), jnp.bfloat16)
  ct = jax.random.normal(ks[3], (1, T, HQ, D), jnp.bfloat16)
  b = jnp.asarray(block_idx, jnp.int32)
  scale = D ** -0.5
  fn = kernel_fn(config, scale, False, {})   # the default tiles, chosen per call
  options = tilings(q, v, b, config, scale, False, default_tiles(q, v))
  chosen = options[int(jnp.argmin(jnp.stack([t.cost for t in options])))].name
  return {"chosen": chosen,
          "fwd_ms": bench_common.median_ms(jax.jit(fn), q, k, v, b, runs=runs),
          "fwd_bwd_ms": bench_common.median_ms(fwd_bwd(fn), q, k, v, b, ct, runs=runs)}


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.8), squeeze=False)
  for ax, row in zip(axes[0], rows):
    x = np.arange(len(TILE_TOKENS))
    for i, layer in enumerate(row["trained"]):
      ax.plot(x, [layer[str(bq)] for bq in TILE_TOKENS], "o-", label=f"trained, layer {i}")
    ax.plot(x, [row["random"][str(bq)] for bq in TILE_TOKENS], "k^--", label="random q")
    ax.set_xticks(x, [str(bq) for bq in TILE_TOKENS])
    ax.set_xlabel("tokens per query tile (Bq)")
    ax.set_ylabel("distinct blocks read per token")
    ax.set_ylim(bottom=0)
    kernel = row.get("kernel")
    note = "" if not kernel else (
        f"\nselected fwd+bwd: trained {kernel['trained']['fwd_bwd_ms']:.1f} ms "
        f"({kernel['trained']['chosen']}), random {kernel['random']['fwd_bwd_ms']:.1f} ms")
    ax.set_title(f"T = {row['T']}{' (extrapolated)' if row['extrapolated'] else ''}{note}",
                 fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle(f"{result['run']} (step {result['step']}) on {result['device']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", help="a training run's directory (its latest checkpoint)")
  parser.add_argument("--lengths", default="8192,65536", help="comma-separated T")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--out", default=bench_common.default_out_dir())
  parser.add_argument("--small", action="store_true",
                      help="an untrained `tiny` model at T = 160, 320 (CPU smoke test)")
  args = parser.parse_args()
  if args.small:
    cfg, step, run = make_config("tiny"), 0, "untrained tiny preset"
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    lengths = [cfg.seq_len, 2 * cfg.seq_len]
  elif args.run:
    model, cfg, step = load_model(args.run)
    run, lengths = args.run, [int(x) for x in args.lengths.split(",")]
  else:
    parser.error("--run is required (or --small)")
  if cfg.model.attention != "nsa":
    raise SystemExit(f"{run} trained attention={cfg.model.attention!r}; this needs an NSA model")
  on_gpu = jax.devices()[0].platform == "gpu"
  mc = cfg.model
  val = data.stdlib_corpus(cfg.val_percent)["val"]
  result = {"run": f"{cfg.preset} preset, {run}", "step": step, "device": bench_common.gpu_name(),
            "jax": jax.__version__, "train_seq_len": cfg.seq_len, "rows": []}
  for T in lengths:
    tokens = data.text_example(np.random.default_rng(T), val, T).tokens[None].astype(np.int32)
    layers = layer_selections(model, jnp.asarray(tokens))
    random = random_block_idx(T, mc.num_heads, mc.num_kv_heads, mc.head_size, mc.nsa,
                              jnp.float32)
    row = {"T": T, "extrapolated": T > cfg.seq_len,
           "trained": [{str(k): v for k, v in blocks_per_token(x).items()} for x in layers],
           "random": {str(k): v for k, v in blocks_per_token(random).items()}}
    if on_gpu and mc.nsa == nsa_jax.NSAConfig():   # Config A's block sizes
      random_a = random_block_idx(T, CONFIG_A["HQ"], CONFIG_A["HKV"], CONFIG_A["D"], mc.nsa,
                                  jnp.bfloat16)
      row["kernel"] = {name: time_kernel(b, mc.nsa, args.runs)
                       for name, b in (("trained", config_a_block_idx(layers)),
                                       ("random", random_a))}
    result["rows"].append(row)
    print(f"T={T}{' (extrapolated)' if row['extrapolated'] else ''}: distinct blocks per token "
          f"for Bq = {TILE_TOKENS}", flush=True)
    for i, layer in enumerate(row["trained"]):
      print(f"  trained layer {i}: " + "  ".join(f"{layer[str(bq)]:6.2f}" for bq in TILE_TOKENS))
    print("  random q:        " + "  ".join(f"{row['random'][str(bq)]:6.2f}" for bq in TILE_TOKENS))
    for name, k in row.get("kernel", {}).items():
      print(f"  Config A selected, {name} block_idx: fwd {k['fwd_ms']:.2f} ms, "
            f"fwd+bwd {k['fwd_bwd_ms']:.2f} ms ({k['chosen']} tiles)", flush=True)
  os.makedirs(args.out, exist_ok=True)
  name = "trained_selections" + ("" if args.small else "_" + bench_common.slug(result["device"]))
  bench_common.write_json(os.path.join(args.out, name + ".json"), result)
  plot(result, os.path.join(args.out, name + ".png"))


if __name__ == "__main__":
  main()
