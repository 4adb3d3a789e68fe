"""The training configuration: one tree (TrainConfig > ModelConfig > NSAConfig), presets, flat
flags, --help, the stored form, and the research preset's size (counted on abstract shapes)."""
import dataclasses
import re

import pytest
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.model import ModelConfig, Transformer, count_params
from nsa_jax.train_config import (FLAGS, NOT_FLAGS, PRESETS, TrainConfig, field_docs, flag_paths,
                                  from_dict, leaf_paths, make_config, parse_args, to_dict)


def test_presets_are_trees_and_flat_names_reach_every_level():
  for name, preset in PRESETS.items():
    cfg = make_config(name)
    assert cfg == preset.config and cfg.preset == name
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.model.nsa, NSAConfig)
  base = make_config("tiny")
  cfg = make_config("tiny", window=32, d_model=64, lr=1e-3)
  assert (cfg.model.nsa.window, cfg.model.d_model, cfg.lr) == (32, 64, 1e-3)
  assert cfg == dataclasses.replace(
      base, lr=1e-3, model=dataclasses.replace(
          base.model, d_model=64, nsa=dataclasses.replace(base.model.nsa, window=32)))
  # Fields of one level change together: no invalid halfway configuration is built.
  assert make_config("tiny", compress_block=48, select_block=48).model.nsa.compress_block == 48


def test_every_leaf_but_two_is_one_documented_flag():
  leaves = {path: cls for path, _, cls in leaf_paths(TrainConfig)}
  assert sorted(FLAGS.values()) == sorted(set(leaves) - NOT_FLAGS)
  assert {flag: path[-1] for flag, path in FLAGS.items() if flag != path[-1]} == {}
  for flag, path in FLAGS.items():
    assert field_docs(leaves[path]).get(path[-1]), f"--{flag} has no description"


def test_a_flag_name_two_fields_share_must_be_given_explicitly():
  @dataclasses.dataclass(frozen=True)
  class Inner:
    seed: int = 0

  @dataclasses.dataclass(frozen=True)
  class Outer:
    seed: int = 0
    inner: Inner = Inner()

  with pytest.raises(ValueError, match=r"--seed would set both seed and inner.seed"):
    flag_paths(Outer, {})
  assert flag_paths(Outer, {("inner", "seed"): "inner_seed"}) == {
      "seed": ("seed",), "inner_seed": ("inner", "seed")}


def test_config_errors_and_cli():
  with pytest.raises(ValueError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
    make_config("tiny", num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match="seq_len=64 holds only 2 selection blocks"):
    make_config("tiny", seq_len=64, mixture="text")
  with pytest.raises(ValueError, match="'mqar' needs seq_len >= 160"):
    make_config("tiny", seq_len=128)
  with pytest.raises(ValueError, match="compress_block=64 must be <= select_block=32"):
    make_config("tiny", compress_block=64)
  with pytest.raises(ValueError, match=r"align=256 must be an int in 1..seq_len=160"):
    make_config("tiny", attention="full", select_block=256)    # packing aligns to select_block
  make_config("tiny", attention="full", select_block=256, pack=False)
  with pytest.raises(ValueError, match="pack_tasks=True needs pack=True"):
    make_config("tiny", pack=False, pack_tasks=True)
  with pytest.raises(ValueError, match="text_weight=0.0 must be > 0"):
    make_config("tiny", text_weight=0.0)
  with pytest.raises(ValueError, match="preset='huge'"):
    make_config("huge")
  with pytest.raises(ValueError, match=r"unknown config field\(s\) d_modle=3"):
    make_config("tiny", d_modle=3)
  cfg = parse_args(["--preset", "tiny", "--head_dim", "none", "--tie_embeddings", "false",
                    "--lr", "1e-3", "--attention", "full", "--steps", "20", "--window", "48",
                    "--pack", "false"])
  assert (cfg.model.head_dim, cfg.model.tie_embeddings, cfg.lr, cfg.model.attention, cfg.steps,
          cfg.model.nsa.window, cfg.pack) == (None, False, 1e-3, "full", 20, 48, False)
  assert cfg.seq_len == 160 and str(cfg.out_dir) == "runs/tiny"
  assert parse_args(["--steps", "30", "--preset", "tiny"]).steps == 30   # --preset anywhere
  assert parse_args([]) == make_config("demo")


def test_bad_flag_values_name_the_flag(capsys):
  for argv, message in [(["--d_model", "wide"], "argument --d_model: 'wide' is not an int"),
                        (["--resume", "maybe"], "'maybe' is not a boolean"),
                        (["--preset", "huge"], "invalid choice: 'huge'")]:
    with pytest.raises(SystemExit):
      parse_args(argv)
    assert message in capsys.readouterr().err


def test_invalid_configurations_from_flags_are_usage_errors(capsys):
  """A flag value the configuration rejects: argparse's usage line and one error line, exit 2
  (no traceback)."""
  for argv, message in [(["--seq_len", "-5"], "seq_len=-5 must be >= 1"),
                        (["--select_block", "36"], "must divide select_block=36"),
                        (["--steps", "1", "--warmup_steps", "3"],
                         "warmup_steps=3 must be in [0, steps=1)")]:
    with pytest.raises(SystemExit) as exit_:
      parse_args(argv)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 2 and err[0].startswith("usage: "), err
    assert err[1].startswith("python -m experiments.train: error: ") and message in err[1], err


def test_steps_alone_keep_the_warmup_below_them():
  assert make_config("demo").warmup_steps == 20
  assert parse_args(["--steps", "1"]).warmup_steps == 0
  assert parse_args(["--steps", "8"]).warmup_steps == 7
  assert parse_args(["--steps", "500"]).warmup_steps == 20
  assert parse_args(["--steps", "8", "--warmup_steps", "2"]).warmup_steps == 2


def help_text(argv, capsys) -> str:
  with pytest.raises(SystemExit):
    parse_args([*argv, "--help"])
  return re.sub(r"\s+", " ", capsys.readouterr().out)   # one line: argparse wraps at will


def test_help_shows_the_chosen_presets_defaults_and_lists_the_presets(capsys):
  text = help_text(["--preset", "gpu-small"], capsys)
  assert "Defaults shown are preset 'gpu-small''s" in text
  gpu = make_config("gpu-small")
  for flag, path in FLAGS.items():
    value = gpu
    for name in path:
      value = getattr(value, name)
    assert re.search(rf"--{flag} \S+ .*?\(default: {re.escape(repr(value))}\)", text), flag
  assert "--seq_len INT tokens per training sequence. (default: 8192)" in text
  for name, preset in PRESETS.items():
    assert f"{name} {preset.summary}" in text
  text = help_text([], capsys)
  assert "Defaults shown are TrainConfig's, which are preset 'demo''s" in text
  assert "--seq_len INT tokens per training sequence. (default: 256)" in text


def test_stored_config_round_trips_and_flat_checkpoints_are_refused():
  for name in PRESETS:
    assert from_dict(to_dict(make_config(name))) == make_config(name)
  stored = to_dict(make_config("tiny"))
  del stored["model"]["nsa"]["window"]      # written before a field existed: its default
  assert from_dict(stored).model.nsa.window == NSAConfig().window
  flat = {"preset": "tiny", "d_model": 32, "window": 64, "seq_len": 160}   # the old layout
  with pytest.raises(ValueError, match=r"no field\(s\) \['d_model', 'window'\].*do not load"):
    from_dict(flat)


def test_research_preset_has_research_shapes_and_the_parameters_its_summary_says():
  """~150M-class model, head_dim 128, G = 4; counted on abstract shapes (nothing allocated)."""
  cfg = make_config("research")
  assert cfg.model.head_size == 128 and cfg.model.num_heads // cfg.model.num_kv_heads == 4
  counts = {}
  for attention in ("full", "nsa"):
    model_cfg = dataclasses.replace(cfg.model, attention=attention)
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    counts[attention] = round(count_params(abstract) / 1e6)
  said = re.search(r"~(\d+)M parameters with full attention, ~(\d+)M with NSA",
                   PRESETS["research"].summary)
  assert counts == {"full": int(said.group(1)), "nsa": int(said.group(2))}
  assert 140 <= counts["full"] <= 180
