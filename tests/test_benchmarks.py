"""The benchmarks run and print what they promise (at tiny sizes; the figures are not checked)."""

import jax

from benchmarks import gpu_step, memory, step_time


def test_step_time_prints_every_variant_with_ratios(capsys):
  step_time.main(["--sizes", "1", "--rounds", "1", "--steps", "1"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("1M")]
  assert [" ".join(row[1:-4]) for row in rows] == [v.name for v in step_time.VARIANTS]
  assert rows[0][-2:] == ["1.00", "1.00"] and all(float(row[-4]) > 0 for row in rows)


def test_memory_reports_the_8bit_step_without_temporaries(capsys):
  memory.main(["--sizes", "1"])
  rows = {line.split()[1] + " " + line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith("1M")}
  kernel = rows["adam8bit kernel"]
  assert kernel[4] == "0.0" and kernel[5] == "no" and float(kernel[6]) < 1 and kernel[-1] == "2.031"


def test_gpu_benchmark_code_runs_on_the_cpu_kernel():
  # The GPU benchmark's own code, checked here so that GPU time is not spent finding its bugs.
  result = gpu_step.measure(2**16, warmup=1, steps=2, device=jax.devices("cpu")[0])
  assert result.uses_kernel and result.kernel_bytes > 0 and result.copy > 0
  text = gpu_step.tables([result])
  assert "target: adam8bit step" in text and "x copy" in text
