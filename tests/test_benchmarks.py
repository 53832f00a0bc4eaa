"""The benchmarks run and print what they promise (at tiny sizes; the figures are not checked)."""

import platform
import shutil

import jax
import pytest

from benchmarks import bnb_fidelity, compile_time, fidelity, gpu_step, memory, offload, step_time


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


def test_compile_time_prints_every_stage_with_ratios(capsys):
  compile_time.main(["--tensors", "2", "3", "--shape", "16", "512", "--rounds", "1", "--distinct", "--donate"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
  assert [row[:3] for row in rows] == [[n, "<=16x512", name] for n in ("2", "3") for name in
                                       ("optax.adamw", "optax8.adamw8bit", "optax8.adamw8bit/optax.adamw")]
  assert all(float(cell.rstrip("x")) > 0 for row in rows for cell in row[3:]) and rows[2][-1].endswith("x")
  assert compile_time.shapes(3, (16, 512), 2**26, distinct=True) == [(16, 512), (16, 511), (15, 512)]
  with pytest.raises(SystemExit):  # tensors of 4 x 512 would keep 32-bit state
    compile_time.main(["--tensors", "4", "--shape", "16", "512", "--max-params", "8192"])


def test_gpu_benchmark_code_runs_on_the_cpu_kernel():
  # The GPU benchmark's own code, checked here so that GPU time is not spent finding its bugs.
  result = gpu_step.measure(2**16, warmup=1, steps=2, device=jax.devices("cpu")[0])
  assert result.uses_kernel and result.kernel_bytes > 0 and result.copy > 0
  text = gpu_step.tables([result])
  assert "target: adam8bit step" in text and "target: fused step" in text and "x copy" in text
  assert result.fused_step > 0


def test_offload_benchmark_compiles_and_times_both_steps(capsys):
  # The GPU stage's own code, at a size where every matrix (62 x 4096) reaches min_size.
  offload.main(["--params", "1e6", "--warmup", "0", "--steps", "1"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("1M")]
  assert [row[1] for row in rows[:2]] == ["adamw8bit", "offload(adamw8bit)"]
  assert rows[0][5] == "0" and rows[1][5] == "16"  # host arrays: 4 matrices x 2 moments x (codes, absmax)
  assert all(float(row[2]) > 0 and float(row[-2]) > 0 for row in rows[:2])
  assert rows[2][1:3] == ["offloading", "saves"]


def test_fidelity_benchmark_measures_both_tables(capsys):
  results = fidelity.main(["--optimizers", "adam,sgd", "--steps", "3", "--seeds", "2"])
  assert set(results) == {"adam", "sgd"}
  assert 0.0 <= results["adam"]["diagnosis"]["zero_fraction"] <= 1.0 and results["adam"]["diagnosis"]["ratio_max"] > 0
  assert all(len(runs) == 2 for runs in results["sgd"]["runs"].values())
  out = capsys.readouterr().out
  assert "1. one gradient sequence" in out and "2. final test loss" in out


def test_bnb_fidelity_benchmark_compares_both_libraries_with_one_float32_run(capsys):
  pytest.importorskip("bitsandbytes")  # the bnb extra
  results = bnb_fidelity.main(["--optimizers", "momentum", "--steps", "2", "--rows", "64"])
  runs = results["momentum"]
  assert {"bitsandbytes", "optax8"} <= set(runs) and all(len(r) == 2 for r in runs.values())
  assert all(dp >= 0 and rel >= 0 for run in runs.values() for dp, rel in run)
  assert "|dp| optax8" in capsys.readouterr().out


def test_cuda_sass_counts_each_functions_instructions_by_opcode():
  from benchmarks import cuda_sass

  listing = """
        Function : _Z5probev
        /*0000*/                   LDC R1, c[0x0][0x28] ;           /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 FADD R2, R3, R4 ;                /* 0x0000000403027221 */
        /*0020*/                   NOP ;                            /* 0x0000000000007918 */
        /*0030*/                   EXIT ;                           /* 0x000000000000794d */
        Function : _Z5otherv
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, R2 ;   /* 0x000000ffff017224 */
  """
  functions = cuda_sass.count_instructions(listing)
  assert functions == {"_Z5probev": {"LDC": 1, "FADD": 1, "EXIT": 1}, "_Z5otherv": {"IMAD": 1}}


def test_cuda_sass_counts_the_block_loops_common_path_without_rare_calls():
  from benchmarks import cuda_sass

  listing = """
        Function : _Z4walkv
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   FADD R2, R3, R4 ;
        /*0020*/                   MUFU.RSQ R5, R2 ;
        /*0030*/              @!P1 BRA 0x70 ;
        /*0040*/                   MOV R6, 0x60 ;
        /*0050*/                   CALL.REL.NOINC 0xb0 ;
        /*0060*/                   BRA 0x80 ;
        /*0070*/                   FMUL.FTZ R7, R2, R5 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R0, 0x8, PT ;
        /*0090*/              @!P0 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   FFMA R7, R2, R5, R6 ;
        /*00c0*/                   RET.REL.NODEC R6 0x0 ;
  """
  code = cuda_sass.parse_sass(listing)["_Z4walkv"]
  common = cuda_sass.common_path_of_loop(code)
  assert common == {"FADD": 1, "MUFU": 1, "BRA": 2, "FMUL": 1, "ISETP": 1}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None,
                    reason="the timing program is x86-64 C++")
def test_cpu_kernel_benchmark_times_every_instruction_set_against_the_same_bytes(capsys):
  from benchmarks import cpu_kernel
  from optax8._src import native_library

  cpu_kernel.main(["--elements", str(16 * 4096), "--rounds", "1"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:]]
  cases = {tuple(row[:3]) for row in rows}
  isas = {row[0] for row in rows}
  assert {"scalar", native_library.cpu_isa() or "scalar"} <= isas
  steps = ("unfused", "fused")
  assert cases == {(isa, family, step) for isa in isas for family in ("adam", "momentum") for step in steps}
  assert all(float(value) > 0 for row in rows for value in row[3:])
