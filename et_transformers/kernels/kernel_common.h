// What our kernels share: ExecuTorch's kernel headers, the two thread-pool entry points we call
// (exported by the wheel's libexecutorch_threadpool.so, which ships no header for them), and the
// names every kernel uses.
#pragma once

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

// Registers a kernel into ExecuTorch's registry when the library loads (a static instance each).
struct KernelRegistrar {
  explicit KernelRegistrar(const executorch::runtime::Kernel& kernel) {
    (void)executorch::runtime::register_kernels({&kernel, 1});
  }
};
}  // namespace et_transformers_kernels
