"""Convergence benchmark: each optax8 optimizer against its optax counterpart, over seeds.

Trains the byte-level transformer LM of :mod:`examples.train_lm` on the standard library's
source, with each optimizer of each pair (``adamw``/``adamw8bit``, ``sgd``/``sgd8bit`` with
momentum 0.9, and every other pair optax8 provides), for several seeds. Both members of a
pair get the same initialisation, batches, hyperparameters and schedule per seed. Prints the
final validation loss's mean and spread per optimizer and the 8-bit optimizer's relative
gap to its 32-bit counterpart, and writes every run's curve to ``--out-dir``.

Run from the repository root::

  python -m benchmarks.convergence                       # all pairs, 3 seeds
  python -m benchmarks.convergence --pairs adamw,sgd --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
from collections.abc import Sequence

import jax

from examples import common, data, train_lm

__all__ = ["main", "summary_table"]

MODEL = train_lm.ModelConfig(num_layers=2, d_model=128, num_heads=4, seq_len=64)
TRAIN = train_lm.TrainConfig(steps=300, batch_size=16, eval_every=50, eval_batches=16)


def summary_table(pairs: Sequence[tuple[str, str]], runs: dict[str, list[train_lm.RunResult]]) -> str:
  """Final validation loss per optimizer over seeds, and each 8-bit optimizer's gap in percent.

  Args:
    pairs: ``(32-bit name, 8-bit name)`` pairs, in table order.
    runs: each optimizer's runs, one per seed.

  Returns:
    The table.
  """
  headers = ["optimizer", "seeds", "mean", "std", "min", "max", "gap vs 32-bit", "state MiB"]
  headers.append("median step ms")
  rows = []
  for pair in pairs:
    means = {name: statistics.fmean(r.final_val_loss for r in runs[name]) for name in pair}
    for name in pair:
      losses = [r.final_val_loss for r in runs[name]]
      std = statistics.stdev(losses) if len(losses) > 1 else 0.0
      gap = "" if name == pair[0] else f"{100 * (means[name] / means[pair[0]] - 1):+.2f}%"
      step_ms = 1e3 * statistics.median(t for r in runs[name] for t in r.step_seconds)
      rows.append([
          name, len(losses), f"{means[name]:.4f}", f"{std:.4f}", f"{min(losses):.4f}", f"{max(losses):.4f}",
          gap, f"{runs[name][0].state_bytes / 2**20:.2f}", f"{step_ms:.1f}",
      ])
  return common.format_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The benchmark's flags."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  train_lm.add_config_flags(parser, MODEL, TRAIN)
  names = ",".join(base for base, _ in common.available_pairs())
  parser.add_argument(
      "--seeds", type=int, default=3, help="how many seeds, from --seed on (default: %(default)s)"
  )
  parser.add_argument("--pairs", default=names, help="comma-separated 32-bit names (default: %(default)s)")
  parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, list[train_lm.RunResult]]:
  """Runs the benchmark, prints the table and writes ``convergence.json``.

  Args:
    argv: command-line flags (default: ``sys.argv[1:]``).

  Returns:
    Each optimizer's runs, one per seed.
  """
  args = parse_args(argv)
  model_cfg, train_cfg = configs = train_lm.configs_from_args(args)
  available = dict(common.available_pairs())
  unknown = [base for base in args.pairs.split(",") if base not in available]
  if unknown:
    raise SystemExit(f"No pair for {', '.join(unknown)}; available: {', '.join(available)}.")
  pairs = [(base, available[base]) for base in args.pairs.split(",")]
  # Runs that differ only in their seed compile the same step: reuse it across runs.
  args.out_dir.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str((args.out_dir / "jax_cache").absolute()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  corpus = data.load_stdlib_corpus()
  print(corpus.describe())
  print(*configs, sep="\n")
  runs: dict[str, list[train_lm.RunResult]] = {name: [] for pair in pairs for name in pair}
  for pair in pairs:
    for seed in range(train_cfg.seed, train_cfg.seed + args.seeds):
      for name in pair:
        cfg = dataclasses.replace(train_cfg, seed=seed)
        result = train_lm.train(name, model_cfg, cfg, corpus, progress=not args.no_progress)
        runs[name].append(result)
        print(f"{name} seed {seed}: final validation loss {result.final_val_loss:.4f}", flush=True)
  print(summary_table(pairs, runs))
  path = args.out_dir / "convergence.json"
  record = {
      "model": dataclasses.asdict(model_cfg),
      "train": dataclasses.asdict(train_cfg),
      "runs": {name: [dataclasses.asdict(r) for r in results] for name, results in runs.items()},
  }
  path.write_text(json.dumps(record, indent=1))
  print(f"wrote {path}")
  return runs


if __name__ == "__main__":
  main()
