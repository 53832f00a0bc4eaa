"""Trains a byte-level transformer LM with Flax NNX, with optax's AdamW and optax8's 8-bit AdamW.

The corpus is the Python standard library's own source (see :mod:`examples.data`), so the
example needs no download. Both runs start from the same initialisation and see the same
batches; the 8-bit run keeps the embedding's state in 32-bit by label. At the end it prints
a table (final validation loss, optimizer-state bytes, compiled-step memory, median step
time) and writes a plot of both validation-loss curves.

Run from the repository root::

  python -m examples.train_lm                      # defaults: about five minutes on 2 CPU cores
  python -m examples.train_lm --steps 400 --checkpoint-dir examples/out/ckpt   # later: add --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import optax8
from examples import common, data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["ModelConfig", "RunResult", "TrainConfig", "TransformerLM", "main", "train"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The transformer's shape.

  The defaults keep the 32-bit embedding small next to the quantized matrices, so the 8-bit
  optimizer state is about 27% of the 32-bit one even with the embedding's state in 32-bit.
  """

  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  seq_len: int = 128
  mlp_ratio: int = 4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long and on what to train."""

  steps: int = 160
  batch_size: int = 8
  eval_every: int = 20
  eval_batches: int = 4
  learning_rate: float | None = None
  seed: int = 0


@dataclasses.dataclass
class RunResult:
  """What one training run measured.

  Attributes:
    optimizer: the optimizer's name.
    start_step: the step training started from (non-zero when resumed).
    eval_steps: the steps at which the validation loss was measured.
    val_losses: the validation losses, one per entry of ``eval_steps``.
    state_bytes: bytes of the optimizer state.
    memory: the compiled step's memory analysis (bytes by kind); empty if unavailable.
    step_seconds: wall time of each step run in this process, compilation excluded.
  """

  optimizer: str
  start_step: int
  eval_steps: list[int]
  val_losses: list[float]
  state_bytes: int
  memory: dict[str, int]
  step_seconds: list[float]

  @property
  def final_val_loss(self) -> float:
    return self.val_losses[-1]


def rotary(x: jax.Array) -> jax.Array:
  """Rotary position embedding of ``x[batch, time, heads, head_dim]`` (no parameters)."""
  half = x.shape[-1] // 2
  freqs = 10000.0 ** (-jnp.arange(half) / half)
  angles = jnp.arange(x.shape[1])[:, None] * freqs
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Block(nnx.Module):
  """A pre-norm transformer block: causal self-attention and a GELU MLP, without biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.num_heads = cfg.num_heads
    self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, cfg.mlp_ratio * d, use_bias=False, rngs=rngs)
    self.mlp_out = nnx.Linear(cfg.mlp_ratio * d, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(self.attn_norm(x)).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = rotary(qkv[:, :, 0]), rotary(qkv[:, :, 1]), qkv[:, :, 2]
    x = x + self.attn_out(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerLM(nnx.Module):
  """A decoder-only byte-level language model with an untied output projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.d_model % cfg.num_heads or (cfg.d_model // cfg.num_heads) % 2:
      raise ValueError(f"d_model ({cfg.d_model}) / num_heads ({cfg.num_heads}) must be an even integer.")
    self.embed = nnx.Embed(data.VOCAB_SIZE, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, data.VOCAB_SIZE, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def lm_loss(model: TransformerLM, batch: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy (nats) of ``batch[:, :-1]`` predicting ``batch[:, 1:]``."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int]:
  """The compiled computation's memory analysis as ``{kind: bytes}`` (empty if unavailable)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  kinds = ("argument", "output", "alias", "temp", "generated_code")
  stats = {k: int(getattr(analysis, f"{k}_size_in_bytes", -1)) for k in kinds}
  stats = {k: v for k, v in stats.items() if v >= 0}
  if {"argument", "output", "alias", "temp"} <= stats.keys():
    stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
  return stats


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def train(
    optimizer_name: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    corpus: data.Corpus,
    *,
    checkpoint_dir: pathlib.Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
  """Trains a fresh (or resumed) model with one optimizer.

  Args:
    optimizer_name: a name for :func:`examples.common.make_optimizer`.
    model_cfg: the model's shape.
    train_cfg: steps, batch size, evaluation, learning rate and seed.
    corpus: the byte corpus.
    checkpoint_dir: if set, checkpoints (model, optimizer state and the loss history) go to
      ``checkpoint_dir / optimizer_name`` at every evaluation.
    resume: continue from the latest checkpoint in ``checkpoint_dir``, if there is one.
    progress: show a progress bar.

  Returns:
    The :class:`RunResult`.
  """
  tx = common.make_optimizer(optimizer_name, train_cfg.steps, train_cfg.learning_rate)

  def create():
    model = TransformerLM(model_cfg, rngs=nnx.Rngs(train_cfg.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  manager = _checkpoint_manager(checkpoint_dir / optimizer_name) if checkpoint_dir else None
  if manager and not resume and manager.latest_step() is not None:
    raise ValueError(
        f"{manager.directory} already holds checkpoints: resume from them or use another directory."
    )
  history = {"eval_steps": [], "val_losses": []}
  if resume and manager and manager.latest_step() is not None:
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), history=ocp.args.JsonRestore()
        ),
    )
    model, optimizer = nnx.merge(graphdef, restored.state)
    history = restored.history
  else:
    model, optimizer = create()
  start_step = int(optimizer.step[...])
  opt_state_bytes = optax8.state_bytes(nnx.state(optimizer.opt_state))
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer  # they share buffers with `state`, which each step donates

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def eval_loss(state, batches):
    model, _ = nnx.merge(graphdef, state)
    return jax.lax.map(lambda batch: lm_loss(model, batch), batches).mean()

  example_batch = data.train_batch(corpus.train, train_cfg.seed, 0, train_cfg.batch_size, model_cfg.seq_len)
  step_fn = jax.jit(train_step, donate_argnums=0).lower(state, example_batch).compile()
  val_batches = data.eval_batches(corpus.val, train_cfg.eval_batches, train_cfg.batch_size, model_cfg.seq_len)
  eval_fn = jax.jit(eval_loss).lower(state, val_batches).compile()

  def evaluate(step):
    history["eval_steps"].append(step)
    history["val_losses"].append(float(eval_fn(state, val_batches)))
    if manager:
      manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)),
          force=True,
      )

  if not history["eval_steps"]:
    evaluate(start_step)
  step_seconds = []
  bar = tqdm(
      range(start_step, train_cfg.steps), desc=optimizer_name, disable=not progress, dynamic_ncols=True
  )
  for step in bar:
    batch = data.train_batch(corpus.train, train_cfg.seed, step, train_cfg.batch_size, model_cfg.seq_len)
    tic = time.perf_counter()
    state, loss = step_fn(state, batch)
    loss = float(loss)
    step_seconds.append(time.perf_counter() - tic)
    if (step + 1) % train_cfg.eval_every == 0 or step + 1 == train_cfg.steps:
      evaluate(step + 1)
    bar.set_postfix(loss=f"{loss:.3f}", val=f"{history['val_losses'][-1]:.3f}")
  if manager:
    manager.wait_until_finished()
    manager.close()
  return RunResult(
      optimizer=optimizer_name,
      start_step=start_step,
      eval_steps=list(history["eval_steps"]),
      val_losses=list(history["val_losses"]),
      state_bytes=opt_state_bytes,
      memory=memory_stats(step_fn),
      step_seconds=step_seconds,
  )


def results_table(results: Sequence[RunResult]) -> str:
  """The comparison table; state ratios are relative to the first result."""
  mb = lambda n: f"{n / 2**20:.2f}"
  mem_kinds = [k for k in ("temp", "argument", "output", "total") if all(k in r.memory for r in results)]
  headers = ["optimizer", "final val loss", "opt state MiB", "state ratio"]
  headers += [f"step {k} MiB" for k in mem_kinds] + ["median step ms"]
  rows = []
  for r in results:
    median_ms = f"{1e3 * statistics.median(r.step_seconds):.1f}" if r.step_seconds else "-"
    ratio = f"{r.state_bytes / results[0].state_bytes:.1%}"
    row = [r.optimizer, f"{r.final_val_loss:.4f}", mb(r.state_bytes), ratio]
    rows.append(row + [mb(r.memory[k]) for k in mem_kinds] + [median_ms])
  return common.format_table(headers, rows)


def plot_val_losses(results: Sequence[RunResult], path: pathlib.Path, title: str) -> None:
  """Writes a PNG of each run's validation loss against the step."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    ax.plot(r.eval_steps, r.val_losses, marker=".", label=f"{r.optimizer} ({r.final_val_loss:.3f})")
  ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def add_config_flags(parser: argparse.ArgumentParser, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
  """Adds a flag for each field of the model and training configs, with their values as defaults."""
  for cfg in (model_cfg, train_cfg):
    for field in dataclasses.fields(cfg):
      default = getattr(cfg, field.name)
      kind, help_text = type(default), "(default: %(default)s)"
      if field.name == "learning_rate":
        kind, help_text = float, "peak learning rate (default: per optimizer)"
      parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default, help=help_text)


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
  """The model and training configs from flags added by :func:`add_config_flags`."""
  pick = lambda cls: cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
  return pick(ModelConfig), pick(TrainConfig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The example's flags."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_config_flags(parser, ModelConfig(), TrainConfig())
  parser.add_argument(
      "--optimizers", default="adamw,adamw8bit", help="comma-separated (default: %(default)s)"
  )
  parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("examples/out"))
  parser.add_argument("--checkpoint-dir", type=pathlib.Path, default=None, help="save checkpoints here")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
  """Trains with each optimizer, prints the table and writes the plot.

  Args:
    argv: command-line flags (default: ``sys.argv[1:]``).

  Returns:
    One :class:`RunResult` per optimizer.
  """
  args = parse_args(argv)
  model_cfg, train_cfg = configs_from_args(args)
  if args.resume and args.checkpoint_dir is None:
    raise SystemExit("--resume needs --checkpoint-dir.")
  corpus = data.load_stdlib_corpus()
  print(corpus.describe())
  print(f"{model_cfg}\n{train_cfg}")
  results = [
      train(
          name, model_cfg, train_cfg, corpus,
          checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=not args.no_progress,
      )
      for name in args.optimizers.split(",")
  ]
  print(results_table(results))
  plot_path = args.out_dir / "train_lm_val_loss.png"
  title = f"byte-level LM on the stdlib, {model_cfg.num_layers}x{model_cfg.d_model}"
  plot_val_losses(results, plot_path, title)
  print(f"wrote {plot_path}")
  return results


if __name__ == "__main__":
  main()
