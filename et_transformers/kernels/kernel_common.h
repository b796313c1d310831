// What our kernels share: ExecuTorch's kernel headers, the two thread-pool entry points we call
// (exported by the wheel's libexecutorch_threadpool.so, which ships no header for them), the names
// every kernel uses, and a few AVX2 helpers (horizontal sum and max, a vectorised exp).
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include <executorch/runtime/core/event_tracer_hooks.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

extern "C" {
typedef struct pthreadpool* pthreadpool_t;
typedef void (*pthreadpool_task_1d_t)(void*, size_t);
void pthreadpool_parallelize_1d(pthreadpool_t, pthreadpool_task_1d_t, void*, size_t, uint32_t);
size_t pthreadpool_get_threads_count(pthreadpool_t);
}
namespace executorch::extension::threadpool {
pthreadpool_t get_pthreadpool();
}

namespace et_transformers_kernels {
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// Names the kernel's time in an ETDump, as ExecuTorch's generated kernel wrappers do for theirs.
using OpScope = executorch::runtime::internal::EventTracerProfileOpScope;

// Threads of ExecuTorch's pool (1 without one).
inline size_t pool_threads() {
  pthreadpool_t pool = executorch::extension::threadpool::get_pthreadpool();
  return pool ? pthreadpool_get_threads_count(pool) : 1;
}

// task(arg, 0 .. n-1): on ExecuTorch's pool when `parallel` and it has more than one thread, else
// here, in order.
inline void run_tasks(pthreadpool_task_1d_t task, void* arg, size_t n, bool parallel) {
  pthreadpool_t pool = executorch::extension::threadpool::get_pthreadpool();
  if (parallel && pool && n > 1 && pthreadpool_get_threads_count(pool) > 1) {
    pthreadpool_parallelize_1d(pool, task, arg, n, 0);
  } else {
    for (size_t i = 0; i < n; ++i) task(arg, i);
  }
}

// e^x for x in [-87, 88] (inputs outside are clamped): 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2],
// p the degree-7 Taylor polynomial (relative error below 2e-8 there).
inline __m256 exp_clamped(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// e^x for x <= 0 (scores minus their max); 0 below -87.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  return _mm256_andnot_ps(underflow, exp_clamped(x));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Registers a kernel into ExecuTorch's registry when the library loads (a static instance each).
struct KernelRegistrar {
  explicit KernelRegistrar(const executorch::runtime::Kernel& kernel) {
    (void)executorch::runtime::register_kernels({&kernel, 1});
  }
};
}  // namespace et_transformers_kernels
