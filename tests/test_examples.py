"""Smoke tests of the examples: tiny models, a few steps each."""

import importlib
import math
import pathlib
import sys

import pytest

for module in ("flax", "orbax.checkpoint", "matplotlib", "tqdm"):
  pytest.importorskip(module)

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
train_lm = importlib.import_module("examples.train_lm")
train_linen = importlib.import_module("examples.train_linen")

TINY_LM = [
    "--num-layers", "1", "--d-model", "64", "--num-heads", "2", "--seq-len", "32", "--batch-size", "4",
    "--eval-every", "2", "--eval-batches", "1", "--no-progress",
]


def test_train_lm_compares_optimizers_and_resumes(tmp_path, capsys):
  flags = TINY_LM + ["--out-dir", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")]
  results = train_lm.main(flags + ["--steps", "4"])
  out = capsys.readouterr().out
  assert [r.optimizer for r in results] == ["adamw", "adamw8bit"]
  for r in results:
    assert r.start_step == 0 and r.eval_steps == [0, 2, 4] and len(r.step_seconds) == 4
    assert all(math.isfinite(v) for v in r.val_losses)
    assert r.final_val_loss < r.val_losses[0]
    assert r.memory.get("total", 1) > 0
  adamw, adamw8bit = results
  assert adamw8bit.state_bytes < 0.5 * adamw.state_bytes
  assert abs(adamw8bit.final_val_loss - adamw.final_val_loss) < 0.05
  assert "final val loss" in out and "adamw8bit" in out
  assert (tmp_path / "out" / "train_lm_val_loss.png").read_bytes()[:4] == b"\x89PNG"

  with pytest.raises(ValueError, match="already holds checkpoints"):
    train_lm.main(flags + ["--steps", "4"])
  (resumed,) = train_lm.main(flags + ["--steps", "6", "--resume", "--optimizers", "adamw8bit"])
  assert resumed.start_step == 4 and len(resumed.step_seconds) == 2
  assert resumed.eval_steps == [0, 2, 4, 6]
  assert resumed.val_losses[:3] == adamw8bit.val_losses
  assert resumed.state_bytes == adamw8bit.state_bytes


def test_train_linen(capsys):
  results = train_linen.main(["--steps", "5", "--batch-size", "16", "--context", "8"])
  out = capsys.readouterr().out
  assert [r.optimizer for r in results] == ["adamw", "adamw8bit"]
  assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in results)
  assert results[1].state_bytes < 0.5 * results[0].state_bytes
  assert "val loss" in out and "adamw8bit" in out
