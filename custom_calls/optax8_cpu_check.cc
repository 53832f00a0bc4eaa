// Whether this CPU can run liboptax8_cpu. Compiled for the baseline ISA, unlike the kernel
// (which is compiled for the building machine's vector extensions), so that optax8 can ask
// before it registers the kernel.
extern "C" __attribute__((visibility("default"))) int Optax8CpuSupported() {
#if defined(OPTAX8_KERNEL_USES_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
  return 1;
#endif
}
