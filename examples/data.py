"""A byte-level corpus every Python installation has: the standard library's own source.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages``
and ``dist-packages`` left out) are split into train and validation *by file*: a file goes
to validation when the CRC32 of its path relative to the stdlib root falls in the
validation fraction, so the split is the same on every run and every machine with the same
Python version, and no file contributes to both sides.

Batches are windows of ``seq_len + 1`` bytes (inputs and next-byte targets). Training
batches depend only on ``(seed, step)``, so a resumed run sees the batches it would have
seen had it never stopped; validation batches are fixed by the corpus alone.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sysconfig
import zlib

import numpy as np

__all__ = ["VOCAB_SIZE", "Corpus", "eval_batches", "load_stdlib_corpus", "train_batch"]

VOCAB_SIZE = 256
_THIRD_PARTY = {"site-packages", "dist-packages"}
_SEPARATOR = b"\n\n"
_EVAL_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Concatenated training and validation bytes.

  Attributes:
    train: ``uint8`` array of every training file, joined by blank lines.
    val: ``uint8`` array of every validation file, joined by blank lines.
    num_train_files: how many files ``train`` holds.
    num_val_files: how many files ``val`` holds.
  """

  train: np.ndarray
  val: np.ndarray
  num_train_files: int
  num_val_files: int

  def describe(self) -> str:
    """A one-line summary of the split."""
    return (
        f"stdlib corpus: {self.num_train_files} train files ({self.train.size / 1e6:.1f} MB), "
        f"{self.num_val_files} validation files ({self.val.size / 1e6:.1f} MB)"
    )


def _stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
  files = (p for p in root.rglob("*.py") if p.is_file())
  return sorted(p for p in files if not _THIRD_PARTY & set(p.relative_to(root).parts))


def _is_val(relative: str, val_fraction: float) -> bool:
  return zlib.crc32(relative.encode()) < val_fraction * 2**32


@functools.cache
def load_stdlib_corpus(val_fraction: float = 0.1) -> Corpus:
  """Reads the standard library's ``.py`` files and splits them by file (once per process).

  Args:
    val_fraction: the expected fraction of files that go to validation, in (0, 1).

  Returns:
    The :class:`Corpus`.

  Raises:
    ValueError: if ``val_fraction`` is out of range or either side ends up empty.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  sides: dict[bool, list[bytes]] = {False: [], True: []}
  for path in _stdlib_files(root):
    sides[_is_val(path.relative_to(root).as_posix(), val_fraction)].append(path.read_bytes())
  if not sides[False] or not sides[True]:
    raise ValueError(f"No {'validation' if sides[False] else 'training'} files found under {root}.")
  join = lambda texts: np.frombuffer(_SEPARATOR.join(texts), dtype=np.uint8)
  return Corpus(join(sides[False]), join(sides[True]), len(sides[False]), len(sides[True]))


def _windows(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
  if tokens.size <= seq_len + 1:
    raise ValueError(f"The corpus ({tokens.size} bytes) is shorter than one window of {seq_len + 1}.")
  starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size)
  return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def train_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
  """The training batch for ``step``: ``int32[batch_size, seq_len + 1]`` random windows.

  Args:
    tokens: the training bytes.
    seed: the run's seed.
    step: the step index; with ``seed`` it alone decides the batch.
    batch_size: windows per batch.
    seq_len: model context length (each window has one more byte, for the targets).

  Returns:
    The batch, ``int32`` byte values.
  """
  return _windows(tokens, np.random.default_rng([seed, step]), batch_size, seq_len)


def eval_batches(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int) -> np.ndarray:
  """A fixed validation set: ``int32[num_batches, batch_size, seq_len + 1]``, the same every run."""
  rng = np.random.default_rng(_EVAL_SEED)
  return np.stack([_windows(tokens, rng, batch_size, seq_len) for _ in range(num_batches)])
