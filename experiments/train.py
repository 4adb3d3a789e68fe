"""Train a byte-level language model whose attention is NSA (or full attention, to compare).

    python experiments/train.py --preset demo                # ~3 min on a laptop CPU
    python experiments/train.py --preset gpu-small --attention full
    python experiments/train.py --preset demo --steps 400    # any TrainConfig field is a flag

Runs resume from the latest checkpoint in --out (default runs/<preset>).
The loop, config and checkpointing live in `nsa_jax.train_lib`; this file is
the command line (also installed as the `nsa-train` console script).
"""
from nsa_jax.train_lib import main

if __name__ == "__main__":
  main()
