"""Writes the README's results section from the committed JSON in experiments/results/.

    python experiments/report.py            # rewrite README.md between the markers
    python experiments/report.py --check    # exit 1 if README.md is out of date

Every figure in that section comes from a results file; none is typed by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import pathlib
import re
import sys

from nsa_jax import data

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
BEGIN, END = "<!-- BEGIN RESULTS (experiments/report.py) -->", "<!-- END RESULTS -->"


def _load(pattern):
  paths = sorted(glob.glob(str(RESULTS / pattern)))
  return [(pathlib.Path(p), json.loads(pathlib.Path(p).read_text())) for p in paths]


def _ms(x):
  return "–" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _x(a, b):
  return "–" if not a or not b else f"{a / b:.2f}x"


def _table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def kernels_section(path, d):
  recs = {}
  for r in d["records"]:
    if "median_ms" in r:
      recs[(r["config"], r["T"], r["G"], r["op"], r["pass"])] = r
  # A shape whose NSA run failed (an error record) takes all its records, NSA
  # and dense alike, from a rerun file (bench_rerun_*.json, same schema), if any.
  failed = {(r["config"], r["T"], r["G"]) for r in d["records"] if "error" in r}
  reruns = [(p, r) for p, rd in _load("bench_rerun_*.json") for r in rd["records"]
            if (r["config"], r["T"], r["G"]) in failed and "median_ms" in r]
  for _, r in reruns:
    recs[(r["config"], r["T"], r["G"], r["op"], r["pass"])] = r
  rerun_files = {p for p, _ in reruns}
  rerun_shapes = {(r["config"], r["T"], r["G"]) for _, r in reruns}
  shapes = sorted({k[:3] for k in recs}, key=lambda k: (k[0][0] == "G", k[0], k[1]))
  get = lambda s, op, p, f="median_ms": recs.get((*s, op, p), {}).get(f)
  rows = []
  for s in shapes:
    nf, nb, df, db = (get(s, "nsa", "fwd"), get(s, "nsa", "fwd+bwd"),
                      get(s, "dense", "fwd"), get(s, "dense", "fwd+bwd"))
    rows.append([s[0] + ("†" if s in rerun_shapes else ""), f"{s[1] // 1024}k", s[2], _ms(nf),
                 _ms(df), _x(df, nf), _ms(nb), _ms(db), _x(db, nb),
                 _x(nf, (get(s, "nsa", "fwd", "flops") or 0) / (d["matmul_tflops"] * 1e9))])
  out = [f"Kernels: `experiments/bench_kernels.py` on one {d['meta']['gpu']} (jax "
         f"{d['meta']['jax_version']}, bf16, B=1, HQ=64, paper block sizes; bf16 matmul measured at "
         f"{d['matmul_tflops']:.0f} TFLOP/s in the same run). Config A: Dk=Dv=128, HKV=4; "
         f"Config B: Dk=192, Dv=128; rows G*: HQ=64, HKV=64/G. Dense is "
         f"`jax.nn.dot_product_attention(implementation=\"cudnn\")`, causal. Times in ms, "
         f"median of {d['records'][0].get('n_iter', 10)} runs on random inputs.",
         "",
         _table(["cfg", "T", "G", "NSA fwd", "cuDNN fwd", "speedup", "NSA fwd+bwd",
                 "cuDNN fwd+bwd", "speedup", "NSA fwd / FLOP floor"], rows), ""]
  out += [line for p, rd in _load("bench_rerun_*.json") if p in rerun_files
          for line in (f"† From `{p.relative_to(ROOT)}` (the same GPU and session, a separate "
                       f"process): {rd['note'].strip()}", "")]
  out += [f"![kernel benchmark]({path.relative_to(ROOT).with_suffix('.png')})", ""]
  T = max(k[1] for k in recs if k[0] == "A" and k[3] == "selected_attention")
  branch = []
  for op in ("compressed_attention", "select_blocks", "selected_attention", "window_attention"):
    f, b = recs.get(("A", T, 16, op, "fwd"), {}), recs.get(("A", T, 16, op, "fwd+bwd"), {})
    name = op if f.get("impl", "pallas") == "pallas" else f"{op} ({f['impl']})"
    branch.append([name, _ms(f.get("median_ms")), _x(f.get("median_ms"), f.get("floor_ms")),
                   _ms(b.get("median_ms")), _x(b.get("median_ms"), b.get("floor_ms"))])
  out += [f"Where the time goes, Config A at T={T // 1024}k (each branch alone; the whole op "
          f"passes the compressed branch's lse to the selection kernel):", "",
          _table(["branch", "fwd ms", "x FLOP floor", "fwd+bwd ms", "x FLOP floor"], branch), ""]
  packed = {k: r for k, r in sorted(recs.items()) if k[3] == "nsa_packed"}
  rows = [[s[0], _len(s[1]), s[2], p, len(r["documents"]), _ms(get(s, "nsa", p)),
           _ms(r["median_ms"]), _x(r["median_ms"], get(s, "nsa", p))]
          for (*s, _, p), r in packed.items()]
  if rows:
    document = max(max(r["documents"]) for r in packed.values())
    out += ["[Packed rows](docs/semantics.md#packed-rows): the whole op with `segment_ids`, "
            f"rows of documents of {document:,} tokens, beside the same op without them "
            "(issue #20's target: "
            "packed / plain <= 1.10x):", "",
            _table(["cfg", "T", "G", "pass", "documents", "NSA ms", "NSA packed ms", "packed / plain"],
                   rows), ""]
  return out


def research_kernels_section(path, d):
  recs = {(r["config"], r["T"], r["op"], r["pass"]): r for r in d["records"] if "median_ms" in r}
  shapes = sorted({(r["config"], r["T"], r["shape"]["B"]) for r in d["records"]},
                  key=lambda s: (s[1], s[0]))
  get = lambda s, op, p: recs.get((s[0], s[1], op, p), {}).get("median_ms")
  rows = [[s[0], _len(s[1]), s[2], _ms(get(s, "nsa", "fwd")), _ms(get(s, "dense", "fwd")),
           _x(get(s, "dense", "fwd"), get(s, "nsa", "fwd")), _ms(get(s, "nsa", "fwd+bwd")),
           _ms(get(s, "dense", "fwd+bwd")), _x(get(s, "dense", "fwd+bwd"), get(s, "nsa", "fwd+bwd"))]
          for s in shapes]
  return [f"Kernels at research shapes: `experiments/bench_kernels.py --research` on one "
          f"{d['meta']['gpu']} (jax {d['meta']['jax_version']}, bf16, paper block sizes): the whole "
          f"`nsa` op against cuDNN at the attention shapes of the training presets, B x T = "
          f"{max(s[1] * s[2] for s in shapes):,} tokens a call. Shape HxGyDz: x query heads, "
          f"G = y query heads per KV head, head dim z (H8G4D64 is `gpu-compare`'s, H16G4D128 "
          f"`research`'s). Times in ms.", "",
          _table(["shape", "T", "B", "NSA fwd", "cuDNN fwd", "speedup", "NSA fwd+bwd",
                  "cuDNN fwd+bwd", "speedup"], rows), "",
          f"![research shapes]({path.relative_to(ROOT).with_suffix('.png')})", ""]


def model_config_text(m):
  return (f"{m['num_layers']} layers, width {m['d_model']}, HQ {m['num_heads']}, "
          f"HKV {m['num_kv_heads']}, head_dim {m['head_dim'] or m['d_model'] // m['num_heads']}")


def train_step_section(path, d):
  key = lambda r: (r["preset"], r["seq_len"], r.get("document"))
  by = {(*key(r), r["attention"]): r for r in d["rows"]}
  rows = []
  for preset, T, document in sorted(dict.fromkeys(map(key, d["rows"])),
                                    key=lambda c: (c[0], c[2] or 0, c[1])):
    n, f = by.get((preset, T, document, "nsa"), {}), by.get((preset, T, document, "full"), {})
    pair = lambda k, fmt: f"{_value(n, k, fmt)} / {_value(f, k, fmt)}"
    rows.append([preset, _len(T), f"packed, {_len(document)} documents" if document else "random",
                 n.get("batch_size", f.get("batch_size")),
                 f"{n.get('memory_option') or '–'} / {f.get('memory_option') or '–'}",
                 _value(n, "tokens_per_s", "{:,.0f}"), _value(f, "tokens_per_s", "{:,.0f}"),
                 f"**{_x(n.get('tokens_per_s'), f.get('tokens_per_s'))}**",
                 pair("compile_s", "{:.1f}"), pair("warm_compile_s", "{:.1f}"),
                 pair("measured_peak_gib", "{:.1f}"), pair("peak_gib", "{:.1f}")])
  params = {(r["preset"], r["attention"]): r["params"] for r in d["rows"] if "params" in r}
  presets = "; ".join(
      f"`{name}`: {model_config_text(m)}, {_count(params.get((name, 'nsa')))} parameters "
      f"with NSA, {_count(params.get((name, 'full')))} with full attention"
      for name, m in d["models"].items())
  packed = (" Packed rows (`--packed`): documents of the given length with their segment ids "
            "([docs/semantics.md](docs/semantics.md#packed-rows)); there full attention runs "
            "on our Pallas kernel with one-token blocks, as cuDNN takes no segment ids."
            if any(r.get("document") for r in d["rows"])
            else "")
  card = d.get("card_memory_bytes")
  memory = (f" Memory options (`--memory`, tried in this order until one fits, the same for "
            f"NSA and full): {', '.join(d['memory_options'])}; the allocator at JAX's defaults "
            f"(a pool of 75 % of the card"
            + (f"'s {card / GIB:.1f} GiB" if card else "") + ")." if "memory_options" in d
            else "")
  not_fit = [f"{r['preset']} {_len(r['seq_len'])} {r['attention']}: "
             + ", ".join(f"{t['memory_option']} ({_failed(t)})" for t in r["not_fit"])
             for r in d["rows"] if r.get("not_fit")]
  return [f"Model level: `experiments/bench_train.py` on one {d['meta']['gpu']} (jax "
          f"{d['meta']['jax_version']}): the training step (forward, backward, AdamW update) of "
          f"the same model with NSA and with full attention (cuDNN), "
          f"{d['tokens_per_step']:,} tokens a step of random bytes, median of {d['steps']} steps "
          f"after compilation (cold; warm: compiled again in a fresh process from the "
          f"persistent compilation cache); peak: the allocator's peak in the row's own "
          f"process, and XLA's estimate, the compiled step's buffer assignment. Presets: "
          f"{presets}.{memory}{packed}", "",
          _table(["preset", "T", "rows", "batch", "memory NSA / full", "NSA tokens/s",
                  "full tokens/s", "NSA / full", "compile s NSA / full",
                  "warm compile s NSA / full", "peak GiB NSA / full",
                  "XLA peak GiB NSA / full"], rows), "",
          *([f"Options that did not fit: {'; '.join(not_fit)}.", ""] if not_fit else []),
          f"Targets (issue #31; `{TARGET_PRESET}`, random rows):", "", *train_targets(d), "",
          *distill_cost(d),
          f"![training step throughput]({path.relative_to(ROOT).with_suffix('.png')})", ""]


GIB = 2 ** 30
TARGET_PRESET = "research"
SPEEDUP_TARGETS = {16384: 1.2, 32768: 2.0, 65536: 2.5, 131072: 4.0}   # NSA / full tokens/s
EVERY_T = (8192, 16384, 32768, 65536, 131072)
DISTILL_COST = 0.15   # issue #29: the distillation loss's share of the NSA step, at most
CARD_80GB = 81559 * 2 ** 20   # an H100 80GB's memory as nvidia-smi reports it
POOL_80GB = 0.75 * CARD_80GB / GIB   # JAX's default pool on it, GiB


def _value(r, key, fmt):
  return fmt.format(r[key]) if r.get(key) is not None else _failed(r) if r else "–"


def _failed(r):
  """Why a bench_train row (or attempt) has no measurement."""
  if r.get("error") == "out of memory":
    asked = r.get("oom_bytes")
    return "out of memory" + (f", {asked / GIB:.1f} GiB asked" if asked else "")
  return (r.get("error") or r.get("skipped") or "–")[:40]


def _peak(r):
  """(GiB, what): the allocator's peak where measured, else XLA's estimate."""
  return ((r["measured_peak_gib"], "allocator") if r.get("measured_peak_gib") is not None
          else (r.get("peak_gib"), "XLA"))


def _judge(name, values, ok, fmt, every=()):
  """One target's line: met when `ok` holds for every measured value ({T: value}) and every T
  of `every` is measured; not measured when nothing (or a T of `every`) is."""
  missing = [T for T in every if T not in values]
  status = ("not measured" if not values or missing else
            "met" if all(ok(v) for v in values.values()) else "not met")
  detail = ", ".join(f"{_len(T)} {fmt(v)}" for T, v in sorted(values.items()))
  if missing:
    detail += ("; " if detail else "") + "not run at " + ", ".join(map(_len, missing))
  return f"- {name}: **{status}**" + (f" ({detail})" if detail else "")


def train_targets(d) -> list[str]:
  """Issue #31's targets for the training step of the research preset (random rows), each
  met, not met or not measured, from a bench_train JSON `d`."""
  runs = {}
  for r in d["rows"]:
    if r["preset"] == TARGET_PRESET and not r.get("document") and "tokens_per_s" in r:
      runs.setdefault(r["seq_len"], {})[r["attention"]] = r
  pairs = {T: (p["nsa"], p["full"]) for T, p in runs.items() if "nsa" in p and "full" in p}
  same = {T: (n, f) for T, (n, f) in pairs.items()
          if n.get("memory_option") == f.get("memory_option")}
  peak = {T: (_peak(n)[0] / _peak(f)[0], _peak(n)[1]) for T, (n, f) in same.items()
          if _peak(n)[0] and _peak(f)[0] and _peak(n)[1] == _peak(f)[1]}
  compile_ = {T: n["compile_s"] / f["compile_s"] for T, (n, f) in pairs.items()}
  warm = {T: p["nsa"]["warm_compile_s"] for T, p in runs.items()
          if p.get("nsa", {}).get("warm_compile_s") is not None}
  speed = {T: n["tokens_per_s"] / f["tokens_per_s"] for T, (n, f) in pairs.items()}
  card = d.get("card_memory_bytes")
  small_card = card is not None and card <= CARD_80GB
  fits = {T: p["nsa"] for T, p in runs.items() if "nsa" in p and p["nsa"].get("check") == "ok"}
  where = (f"on this {card / GIB:.0f} GiB card" if small_card else
           f"peak within an 80 GB card's default pool, {POOL_80GB:.1f} GiB")
  return [
      _judge("NSA peak <= 1.1x full's at the same memory option", peak,
             lambda v: v[0] <= 1.1, lambda v: f"{v[0]:.2f}x ({v[1]})"),
      _judge("NSA compile (cold) <= 2x full's", compile_, lambda v: v <= 2.0, "{:.2f}x".format),
      _judge("NSA warm start (compile from the cache) <= 5 s", warm, lambda v: v <= 5.0,
             "{:.1f} s".format),
      *(_judge(f"NSA / full tokens/s >= {target:g}x at {_len(T)}",
               {T: speed[T]} if T in speed else {}, lambda v, t=target: v >= t,
               "{:.2f}x".format, every=(T,))
        for T, target in SPEEDUP_TARGETS.items()),
      _judge(f"NSA trains on one 80 GB GPU at every T 8k..128k ({where})", fits,
             lambda r: small_card or (_peak(r)[0] or math.inf) <= POOL_80GB,
             lambda r: f"{r.get('memory_option') or 'default'}, {_gib(_peak(r)[0])} GiB "
                       f"{_peak(r)[1]}", every=EVERY_T)]


def distill_cost(d) -> list[str]:
  """Issue #29's cost target from the `nsa+distill` rows (bench_train --distill): the NSA
  step's time with the selection distillation loss against without, per (preset, T)."""
  by = {(r["preset"], r["seq_len"], r.get("document"), r["attention"]): r for r in d["rows"]
        if "step_ms" in r}
  flags = lambda r: f"{r['select_distill']:g}" + (
      f" --distill-stride {r['select_distill_stride']}"
      if r.get("select_distill_stride", 1) > 1 else "")
  costs = [(preset, T, flags(r), r["step_ms"] / by[(preset, T, doc, "nsa")]["step_ms"] - 1)
           for (preset, T, doc, attention), r in by.items()
           if attention == "nsa+distill" and (preset, T, doc, "nsa") in by]
  if not costs:
    return []
  judged = [c <= DISTILL_COST for p, T, _, c in costs if p == TARGET_PRESET and T in (8192, 32768)]
  verdict = f" (**{'met' if all(judged) else 'not met'}**)" if judged else ""
  text = ", ".join(f"`{p}` {_len(T)} (`--distill {f}`) {c:+.0%}" for p, T, f, c in costs)
  return [f"Selection distillation (issue #29: at most {DISTILL_COST:.0%} of the NSA step at "
          f"8k and 32k): {text}{verdict}.", ""]


def _gib(x):
  return "–" if x is None else f"{x:.1f}"


def _len(T):
  return f"{T // 1024}k" if T >= 1024 else str(T)


def _count(n):
  return "?" if n is None else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


def training_section(path, d):
  rows = []
  for name, r in d["runs"].items():
    val = {t: v["loss"][-1] for t, v in r["val"].items()}
    acc = r.get("retrieval", {}).get("accuracy")
    mean_acc = sum(map(sum, acc)) / sum(map(len, acc)) if acc else None
    rows.append([name, r["steps"], f"{r['tokens']:,}", f"{r['tokens_per_s_median']:,.0f}",
                 *(f"{val[t]:.4f}" for t in sorted(val)),
                 "–" if mean_acc is None else f"{mean_acc:.0%}"])
  tasks = sorted(next(iter(d["runs"].values()))["val"])
  return [f"Training: `experiments/compare_attention.py` (preset `{d['preset']}`, seq len "
          f"{d['seq_len']}, batch {d['batch_size']}) on one {d['device']}, the same data and "
          f"steps for both attentions:", "",
          _table(["attention", "steps", "tokens", "train tokens/s", *(f"final {t}" for t in tasks),
                  "passkey accuracy"], rows), "",
          f"![validation loss]({path.relative_to(ROOT).with_suffix('.png')})", ""]


def _mean(row):
  return sum(row) / len(row)


def _holds_up_to(run):
  """The longest evaluated length up to which every length's accuracy (mean over depths) is >= 90 %."""
  longest = None
  for n, row in zip(run["lengths"], run["accuracy"]):
    if _mean(row) < 0.9:
      break
    longest = n
  return "nowhere" if longest is None else f"{longest:,} tokens"


def _blocks_text(c):
  return (f"l = {c['compress_block']}, d = {c['compress_stride']}, l' = {c['select_block']}, "
          f"n = {c['num_selected']} ({c['num_initial']} initial + {c['num_local']} local), "
          f"w = {c['window']}")


def _at_train_len(run, values):
  """Mean over depths of `values` (a [length][depth] grid of `run`'s) at the training length."""
  return _mean(dict(zip(run["lengths"], values))[run["train_len"]])


def retrieval_targets(nsa, full) -> str:
  """Issue #21's targets, from the results: full >= 90 % at the training length, NSA >= full
  at every length."""
  full_at = _at_train_len(full, full["accuracy"])
  behind = [f"{n:,} ({_mean(a):.0%} vs {_mean(f):.0%})"
            for n, a, f in zip(nsa["lengths"], nsa["accuracy"], full["accuracy"])
            if _mean(a) < _mean(f)]
  return (f"Targets (issue #21): full attention >= 90 % at the training length: "
          f"{'met' if full_at >= 0.9 else 'not met'} ({full_at:.0%}); NSA >= full attention at "
          f"every length: " + ("met." if not behind else "not met, behind at " + ", ".join(behind)
                               + "."))


def retrieval_runs(files) -> str:
  """One row per committed run, [(path, its JSON)] (this one and those in results/history/):
  what differed and what came out at the training length."""
  rows = []
  for path, d in files:
    nsa, full = d["runs"]["nsa"], d["runs"]["full"]
    rows.append([f"`{path.relative_to(RESULTS)}`", _blocks_text(d["nsa_config"]),
                 f"{nsa['tokens'] / 1e6:.0f}M", f"{nsa['train_len']:,}",
                 f"{_at_train_len(nsa, nsa['accuracy']):.0%}",
                 f"{_at_train_len(full, full['accuracy']):.0%}",
                 f"{_at_train_len(nsa, nsa['selection_recall']['mean']):.2f} / "
                 f"{_at_train_len(nsa, nsa['selection_recall']['chance']):.2f}",
                 _strict_at_train_len(nsa)])
  return _table(["run", "NSA blocks", "tokens", "trained to", "NSA accuracy", "full accuracy",
                 "NSA recall / chance", "NSA strict recall / chance"], rows)


def _strict_at_train_len(run) -> str:
  """Strict recall / its chance at the training length (mean over depths; layers >= 1), or
  a dash for a run evaluated before strict recall existed."""
  strict = run["selection_recall"].get("strict")
  return "–" if strict is None else (f"{_at_train_len(run, strict['mean']):.2f} / "
                                     f"{_at_train_len(run, strict['chance']):.2f}")


def _best_strict_layer(run) -> tuple[int, float]:
  """(layer, strict recall) of the layer >= 1 with the highest strict recall at the
  training length (mean over KV groups and depths)."""
  at = run["lengths"].index(run["train_len"])
  per_layer = [_mean([_mean(g[at]) for g in layer])
               for layer in run["selection_recall"]["strict"]["per_layer_group"]]
  return max(enumerate(per_layer[1:], start=1), key=lambda x: x[1])


def _recipe_targets(d, name) -> list[tuple[str, bool, str]]:
  """Issue #29's targets for one recipe, each (short name, met, what was measured with a {}
  for the verdict): >= 95 % at the training length, >= full attention at every length up to
  the longest where full attention holds >= 90 % (RoPE past its training length), strict
  recall >= 0.9 in a layer >= 1, text validation loss within 1 % of the baseline's (the same
  recipe without an aid)."""
  run, full, base = d["recipes"][name], d["full"], d["recipes"]["baseline"]
  sound = [n for n, f in zip(full["lengths"], full["accuracy"]) if _mean(f) >= 0.9]
  upto = max(sound) if sound else full["train_len"]
  passkeys = lambda r, row: round(sum(row) * r["samples"])   # answered, of samples x depths
  behind = [f"{_len(n)} ({_mean(a):.0%} vs {_mean(f):.0%}, p = "
            f"{_fisher_p(passkeys(run, a), passkeys(full, f), run['samples'] * len(a)):.2f})"
            for n, a, f in zip(run["lengths"], run["accuracy"], full["accuracy"])
            if n <= upto and _mean(a) < _mean(f)]
  acc = _at_train_len(run, run["accuracy"])
  layer, strict = _best_strict_layer(run)
  text = run["val"]["val_text"] / base["val"]["val_text"] - 1
  where = ("full attention's last length at >= 90 %" if sound else
           "the training length: full attention is at >= 90 % nowhere")
  return [("95 %", acc >= 0.95, f">= 95 % at the training length: {{}} ({acc:.0%})"),
          ("full attention", not behind,
           f">= full attention at every length up to {_len(upto)} ({where}): {{}}"
           + ("" if not behind else ", behind at " + ", ".join(behind)
              + " (p: the chance of so few answers if both models answered alike)")),
          ("strict recall", strict >= 0.9,
           f"strict recall >= 0.90 in a layer >= 1: {{}} ({strict:.2f}, layer {layer})"),
          ("text loss", text <= 0.01,
           f"text validation loss within 1 % of the baseline's: {{}} ({text:+.1%})")]


def _fisher_p(k_a: int, k_b: int, n: int) -> float:
  """One-sided Fisher exact test of k_a against k_b successes in n trials each: the
  probability that a model answering as often as the other (k_a + k_b answers over both)
  answers k_a times or fewer, under a split of the answers at random."""
  K = k_a + k_b
  total = math.comb(2 * n, n)
  return sum(math.comb(K, x) * math.comb(2 * n - K, n - x)
             for x in range(max(0, K - n), k_a + 1)) / total


def ablation_targets(d) -> str:
  """Issue #29's targets (`_recipe_targets`) for the winner, then how many of them each other
  recipe with an aid meets and which it misses."""
  ok = lambda c: "met" if c else "not met"
  won = _recipe_targets(d, d["winner"])
  lines = [f"Targets (issue #29) for the winner, `{d['winner']}`: "
           + "; ".join(text.format(ok(met)) for _, met, text in won) + "."]
  others = []
  for name in d["recipes"]:
    if name in (d["winner"], "baseline"):
      continue
    targets = _recipe_targets(d, name)
    missed = [short for short, met, _ in targets if not met]
    others.append(f"`{name}` {len(targets) - len(missed)} of {len(targets)}"
                  + (f" (not met: {', '.join(missed)})" if missed else ""))
  if others:
    lines.append("The other recipes: " + "; ".join(others) + ".")
  return " ".join(lines)


def _key_gap() -> int:
  """At needle depth 100 %, tokens from the answer's first digit back to the first digit of
  the needle's last copy of the key (`nsa_jax.data.passkey_example`)."""
  key = "0" * data.PASSKEY_DIGITS
  needle = data.PASSKEY_NEEDLE.format(key=key)
  return len(data.PASSKEY_QUESTION) + len(needle) - needle.rindex(key)


def ablation_section(path, d):
  """The recipes of `experiments/retrieval.py --recipes` (retrieval_ablation_*.json): one row
  each (and full attention's), their accuracy per depth at the training length, and the mean
  gates at the answer's queries at each depth."""
  runs = [(name, r) for name, r in d["recipes"].items()]
  models = [*runs, *([("full attention", d["full"])] if "full" in d else [])]
  first = runs[0][1]
  tasks = sorted(first["val"])
  rows = []
  for name, r in models:
    rec = r.get("selection_recall")
    rows.append([f"**{name}**" if name == d["winner"] else name,
                 " ".join(f"`{x}`" for x in r.get("settings", [])) or "–",
                 *(f"{_mean(a):.0%}" for a in r["accuracy"]),
                 "–" if rec is None else f"{_at_train_len(r, rec['mean']):.2f} / "
                                         f"{_at_train_len(r, rec['chance']):.2f}",
                 "–" if rec is None else _strict_at_train_len(r),
                 "–" if rec is None else "{1:.2f} (layer {0})".format(*_best_strict_layer(r)),
                 *(f"{r['val'][t]:.4f}" for t in tasks)])
  gates = [[name, f"layer {i}", *("/".join(f"{x:.2f}" for x in g) for g in layer)]
           for name, r in runs for i, layer in enumerate(r["gates"]["per_layer_depth"])]
  by_depth = [[name, *(f"{a:.0%}" for a in r["accuracy"][r["lengths"].index(r["train_len"])])]
              for name, r in models]
  stages = " -> ".join(f"{s['seq_len']} x {s['batch_size']} x {s['steps']}" for s in d["stages"])
  return [f"Selection-learning ablation (issue #29): `experiments/retrieval.py --recipes` on "
          f"{d['device']}: NSA ({_blocks_text(d['nsa_config'])}; {model_config_text(d['model'])}, "
          f"G = {d['model']['num_heads'] // d['model']['num_kv_heads']}, {d['dtype']}) with each "
          f"recipe on the same {first['tokens']:,} tokens of `{d['mixture']}` (stages {stages}; "
          f"seed {d.get('seed', 0)}" + (f", `--tag {d['tag']}`" if "tag" in d else "")
          + f"); {first['samples']} passkeys per cell. Accuracy: mean over the depths per "
          f"context length; recall and strict recall (every key digit's block selected, "
          f"layers >= 1) at the training length {first['train_len']:,}, next to chance "
          f"(random free slots); the winner (best mean accuracy) in bold:", "",
          _table(["recipe", "settings", *(f"accuracy {_len(n)}" for n in first["lengths"]),
                  "recall / chance", "strict / chance", "strict, best layer >= 1", *tasks],
                 rows), "",
          *([ablation_targets(d), ""] if "full" in d and "baseline" in d["recipes"] else []),
          f"Accuracy at the training length {first['train_len']:,} per needle depth (at 100 % "
          f"the needle's last copy of the key starts {_key_gap()} tokens before the answer; "
          f"w = {d['nsa_config']['window']}):", "",
          _table(["recipe", *(f"{100 * x:.0f}%" for x in first["depths"])], by_depth), "",
          "Mean gates g_cmp / g_slc / g_win at the answer's queries per depth (mean over "
          "lengths, heads and the 5 answer queries):", "",
          _table(["recipe", "layer", *(f"{100 * x:.0f}%" for x in first["depths"])], gates), ""]


def retrieval_section(path, d):
  if "recipes" in d:
    return ablation_section(path, d)
  nsa, full = d["runs"]["nsa"], d["runs"]["full"]
  rec = nsa["selection_recall"]
  pct = lambda row: f"{_mean(row):.0%}"
  strict = rec.get("strict", {"mean": [None] * len(nsa["lengths"]),
                               "chance": [None] * len(nsa["lengths"])})
  two = lambda row: "–" if row is None else f"{_mean(row):.2f}"
  rows = [[f"{n:,}" + (" (trained)" if n == nsa["train_len"] else ""), pct(a), pct(f),
           f"{_mean(r):.2f}", f"{_mean(m):.2f}", f"{_mean(c):.2f}", two(sm), two(sc)]
          for n, a, f, r, m, c, sm, sc in zip(nsa["lengths"], nsa["accuracy"], full["accuracy"],
                                              rec["mean"], rec["max"], rec["chance"],
                                              strict["mean"], strict["chance"])]
  at = nsa["lengths"].index(nsa["train_len"]) if nsa["train_len"] in nsa["lengths"] else -1
  groups = len(rec["per_layer_group"][0])
  layers = [[f"layer {i}", *(f"{_mean(g[at]):.2f}" for g in layer)]
            for i, layer in enumerate(rec["per_layer_group"])]
  tasks = sorted(nsa["val"])
  val = [[name, *(f"{r['val'][t]:.4f}" for t in tasks)] for name, r in (("NSA", nsa),
                                                                     ("full", full))]
  stages = " -> ".join(f"{s['seq_len']} x {s['batch_size']} x {s['steps']}" for s in d["stages"])
  m = d["model"]
  history = [(p, h) for p, h in _load("history/retrieval_*.json") if "runs" in h]
  recipe = (f", recipe `{d['recipe']}`: " + (" ".join(f"`{x}`" for x in nsa.get("settings", []))
                                           or "the paper's") if d.get("recipe") else "")
  return [f"Retrieval: `experiments/retrieval.py` on one {d['device']}: NSA "
          f"({_blocks_text(d['nsa_config'])}{recipe}) and full attention "
          f"({model_config_text(m)}, {d['dtype']}) trained on the same {nsa['tokens']:,} "
          f"tokens ({nsa['steps']} steps; stages seq_len x batch x steps: {stages}) of "
          f"`{d['mixture']}` ({'several' if d['pack_tasks'] else 'one'} passkey or mqar "
          f"example{'s' if d['pack_tasks'] else ''} per row); {nsa['samples']} passkeys per cell at depths "
          + ", ".join(f"{100 * x:.0f}%" for x in nsa["depths"])
          + ". Accuracy: all 5 digits right under greedy decoding, mean over the depths. "
          "Recall: how often a block of the needle sentence is among the blocks an answer "
          "query selects (mean over layers and KV groups, and the best layer/group), next to "
          "a random choice of the free slots; strict recall: how often they hold every digit "
          "of the key (layers >= 1):", "",
          _table(["context", "NSA accuracy", "full accuracy", "NSA recall", "best layer/group",
                  "chance", "strict recall", "strict chance"], rows), "",
          retrieval_targets(nsa, full) + " "
          f"Accuracy stays >= 90 % at every length up to: NSA {_holds_up_to(nsa)}, full "
          f"attention {_holds_up_to(full)} (trained up to {nsa['train_len']:,} tokens). "
          f"NSA's recall per layer and KV group at {nsa['lengths'][at]:,} tokens (mean over "
          f"depths), and the validation losses after the last stage:", "",
          _table(["NSA layer", *(f"group {g}" for g in range(groups))], layers), "",
          _table(["attention", *tasks], val), "",
          f"![retrieval]({path.relative_to(ROOT).with_suffix('.png')})", "",
          f"![a needle and the blocks selected for it]"
          f"({path.relative_to(ROOT).with_suffix('')}_example.png)", "",
          *(["Every committed run, at the training length (accuracy and recall: mean over "
             "the depths):", "", retrieval_runs([(path, d), *history]), ""] if history else [])]


def decode_section(path, d):
  rows = []
  for r in d["results"]:
    best = min(v for k, v in r.items() if k.startswith("dense_") and isinstance(v, float))
    rows.append([f"{r['T'] // 1024}k", r["B"], f"{1e6 * r['nsa_pallas']:.0f}",
                 f"{1e6 * best:.0f}", _x(best, r["nsa_pallas"]),
                 _x(r["nsa_pallas"], r["nsa_byte_time"])])
  return [f"Decoding: `experiments/bench_decode.py` on one {d['meta']['device']}: one attention "
          f"decode step (HQ=64, HKV=4, D=128, bf16), NSA's Pallas kernel against the faster of "
          f"cuDNN and XLA dense attention over the same cache; byte time = the K/V bytes NSA "
          f"must read at {d['meta']['read_bandwidth_Bps'] / 1e12:.1f} TB/s, the best read rate "
          f"measured in the run:", "",
          _table(["context", "batch", "NSA µs", "dense µs", "speedup", "NSA / byte time"], rows), "",
          f"![decode benchmark]({path.relative_to(ROOT).with_suffix('.png')})", ""]


def scaling_section(path, d):
  cfg = d["meta"]["config"]
  rows = [[r["mesh"], r["devices"], r["batch"], _len(r.get("seq_len", cfg.get("seq_len", 8192))),
           f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['efficiency']:.1%}"]
          for mode in d["results"].values() for r in mode]
  layers = re.search(r"num_layers=(\d+)", cfg["model"]).group(1)
  heads = cfg.get("heads_overrides")
  return [f"Sharding: `experiments/bench_scaling.py` on {d['meta']['gpu']}s, "
          f"`{path.relative_to(ROOT)}` (training step of the "
          f"{layers}-layer NSA model of preset `{cfg.get('preset', '?')}`"
          + (f"; heads rows with {heads}" if heads else "") + "):", "",
          _table(["mesh", "GPUs", "global batch", "T", "step ms", "tokens/s", "efficiency"],
                 rows), ""]


def context_memory_section(path, d):
  cfg = d["meta"]["config"]
  rows = [[f["devices"], f"{f['bytes_per_token'] / 1e3:.0f}", f"{f['per_token_vs_one_device']:.2f}",
           f"{1 / f['devices']:.2f}", f"~{f['max_seq_len'] / 1e6:.1f}M"] for f in d["fits"]]
  lengths = " and ".join(_len(T) for T in cfg["seq_lens"])
  return [f"Context parallelism, memory per device (an estimate): `experiments/context_memory.py`, "
          f"`{path.relative_to(ROOT)}`: the `{cfg['preset']}` training step of one sequence "
          f"compiled on the CPU for context=1..8 (XLA's buffer assignment, the reference ops) at "
          f"T = {lengths}, a line through the two points per mesh; bytes per token of the "
          f"sequence, and the T where the line reaches {cfg['device_gb']:.0f} GB (an H200), "
          f"extrapolated:", "",
          _table(["context (GPUs)", "kB / token / device", "x one device", "1 / P",
                  f"T at {cfg['device_gb']:.0f} GB"], rows), "",
          f"![context memory]({path.relative_to(ROOT).with_suffix('.png')})", ""]


CHECKS = {
    "gpu_matrix": "Correctness, issue #18's matrix (`experiments/gpu_check.py --matrix`): every "
                  "branch op and `nsa` (impl auto and pallas) against the float32 reference, "
                  "head sizes 32/32 .. 256/256, G 1 .. 16, bf16 and f32, T = 1000 and 300, B = 2; "
                  "tensors past 2^31 elements (9 x 32k and 7 x 32k rows at HQ 64, each last row "
                  "against itself alone; a 256k-token row's last 256 queries against the "
                  "reference); `nsa`'s selection against `select_blocks`' (share of rows).",
    "gpu_packed": "Correctness, [packed rows](docs/semantics.md#packed-rows) "
                  "(`experiments/gpu_check.py --packed`): every op on rows of several documents "
                  "against each document run alone "
                  "(outputs, selection, all gradients).",
    "gpu_offsets": "Correctness, query offsets (`experiments/gpu_check.py --offsets`, issue "
                   "#23): a context shard's work, the sparse branches of query slices at traced "
                   "offsets, against the whole call.",
}


def check_groups(records) -> list[tuple]:
  """`experiments/gpu_check.py` records (probes apart) grouped by (op, impl, dtype):
  [(op, impl, dtype, records, worst)], worst the record of the largest error over its
  tolerance (None where none was measured). gpu_check prints them; the README shows them."""
  groups = {}
  for r in records:
    if not r["probe"]:
      groups.setdefault((r["op"], r["impl"], r["dtype"]), []).append(r)
  return [(*key, rs, max((r for r in rs if r["rel_err"] is not None), default=None,
                         key=lambda r: r["rel_err"] / max(r["tol"], 1e-30)))
          for key, rs in groups.items()]


def _error_text(message: str) -> str:
  """An error record's message in a few words: out of memory with the bytes asked, else its
  first 80 characters."""
  asked = re.search(r"Out of memory while trying to allocate (\S+)", message)
  return f"out of memory, {asked.group(1)} asked" if asked else message[:80]


def correctness_section(path, d):
  rows = []
  for op, impl, dtype, rs, worst in check_groups(d["records"]):
    rows.append([op, impl, dtype, f"{sum(r['status'] == 'pass' for r in rs)} / {len(rs)}",
                 worst and f"{worst['rel_err']:.2g} ({worst['worst']}, {worst['case']})",
                 f"{rs[0]['tol']:g}"])
  kind = path.stem.rsplit("_", 1)[0]
  summary = ", ".join(f"{n} {k}" for k, n in d["summary"].items())
  errors = sorted({f"{r['case']} {r['op']} ({r['impl']}): {_error_text(r['message'])}"
                   for r in d["records"] if r["status"] == "error"})
  runs = len(d["meta"].get("runs", []))
  return [f"{CHECKS[kind]} On one {d['meta']['gpu']} (jax {d['meta']['jax_version']}"
          f"{f', {runs} runs merged' if runs > 1 else ''}), `{path.relative_to(ROOT)}`: "
          f"{summary}. Error: norm-relative, worst over a group's records and quantities.", "",
          _table(["op", "impl", "dtype", "passed", "worst error", "tolerance"], rows), "",
          *([f"Errors: {'; '.join(errors)}.", ""] if errors else [])]


def trained_selections_section(path, d):
  rows = []
  for r in d["rows"]:
    trained = lambda bq: [layer[str(bq)] for layer in r["trained"]]
    spread = lambda bq: f"{min(trained(bq)):.1f} - {max(trained(bq)):.1f}"
    k = r.get("kernel", {})
    kernel = lambda name: (f"{_ms(k[name]['fwd_ms'])} / {_ms(k[name]['fwd_bwd_ms'])} "
                           f"({k[name]['chosen']})" if name in k else "–")
    rows.append([f"{r['T'] // 1024}k" + (" (extrapolated)" if r["extrapolated"] else ""),
                 *(f"{spread(bq)} vs {r['random'][str(bq)]:.1f}" for bq in (2, 4, 8)),
                 kernel("trained"), kernel("random")])
  return [f"Trained selections (a one-off script, `experiments/trained_selections.py` in git "
          f"history at cf085fe) on one {d['device']}: "
          f"block_idx of a model trained {d['step']} steps at T={d['train_seq_len']} "
          f"({d['run']}) on a validation text sequence, against random q; distinct blocks a "
          f"query tile of Bq tokens reads per token (trained, over the layers, vs random), and "
          f"the Config A selected kernel (ms fwd / fwd+bwd, the tiling it chose) with either "
          f"block_idx:", "",
          _table(["T", "Bq = 2", "Bq = 4", "Bq = 8", "selected, trained block_idx",
                  "selected, random block_idx"], rows), "",
          f"![trained selections]({path.relative_to(ROOT).with_suffix('.png')})", ""]


NOT_MEASURED = {
    "bench_train_*.json": ["Model level ([docs/benchmarks.md](docs/benchmarks.md#model-level)): "
                           "not measured yet. On a GPU, `python experiments/bench_train.py` writes "
                           "`experiments/results/bench_train_<gpu>.json`: the training step of "
                           "the `gpu-compare` and `research` presets with NSA and with full "
                           "attention at T = 8k..128k (research), 8k..64k (gpu-compare).", ""],
    "retrieval_*.json": ["Retrieval: not measured yet. On a GPU, `python experiments/retrieval.py "
                         "--out experiments/results` (run it again until it says done) writes "
                         "`experiments/results/retrieval_<gpu>.json`: NSA and full attention "
                         "learning passkey retrieval on the same curriculum, passkey accuracy "
                         "over length x depth and NSA's selection recall.", ""],
}


def render() -> str:
  parts = []
  for pattern, fn in [("bench_kernels_*.json", kernels_section),
                      ("research_kernels_*.json", research_kernels_section),
                      ("bench_train_*.json", train_step_section),
                      ("compare_attention_*.json", training_section),
                      ("retrieval_*.json", retrieval_section),
                      ("trained_selections_*.json", trained_selections_section),
                      ("bench_decode_*.json", decode_section),
                      ("scaling_*.json", scaling_section),
                      ("context_memory*.json", context_memory_section),
                      ("gpu_matrix_*.json", correctness_section),
                      ("gpu_packed_*.json", correctness_section),
                      ("gpu_offsets_*.json", correctness_section)]:
    files = _load(pattern)
    for path, d in files:
      parts += fn(path, d)
    if not files:
      parts += NOT_MEASURED.get(pattern, [])
  return "\n".join([BEGIN, *parts, END])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true")
  args = parser.parse_args(argv)
  readme = ROOT / "README.md"
  text = readme.read_text()
  start, stop = text.index(BEGIN), text.index(END) + len(END)
  new = text[:start] + render() + text[stop:]
  if args.check:
    sys.exit(0 if new == text else "README.md results are stale: run python experiments/report.py")
  readme.write_text(new)


if __name__ == "__main__":
  main()
