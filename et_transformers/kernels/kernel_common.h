// What our kernels share: ExecuTorch's kernel headers, the thread-pool entry points we call (for
// its thread count; exported by the wheel's libexecutorch_threadpool.so, which ships no header for them), the spin
// pool our parallel loops run on, the names every kernel uses, and a few AVX2 helpers (horizontal
// sum and max, a vectorised exp).
#pragma once

#include <immintrin.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>

#include <executorch/runtime/core/event_tracer_hooks.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

extern "C" {
typedef struct pthreadpool* pthreadpool_t;
typedef void (*pthreadpool_task_1d_t)(void*, size_t);
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

// A small pool of our own for our kernels' parallel loops, sized like ExecuTorch's (its thread
// count is the user's setting). Its workers spin for a while after each loop before they sleep:
// a decode step is ~120 short GEMMs with a few microseconds of serial work between them, and
// ExecuTorch's pool puts its workers to sleep between calls, so waking them cost more than the
// second thread gained. The spin is bounded (kSpinNs of no work, then a condition-variable wait),
// so an idle process uses no CPU. One loop runs at a time: a caller that finds the pool busy (a
// second program running on another thread) runs its loop itself. After fork() the child has no
// workers; the pool starts new ones there on first use.
class SpinPool {
 public:
  static SpinPool& get() {
    static SpinPool* pool = new SpinPool();  // never destroyed: detached workers may still spin at exit
    return *pool;
  }

  // task(arg, 0 .. n-1) on `threads` threads (this one included); returns when all are done.
  void run(pthreadpool_task_1d_t task, void* arg, size_t n, size_t threads) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || threads <= 1 || n <= 1) {
      for (size_t i = 0; i < n; ++i) task(arg, i);
      return;
    }
    ensure_workers(std::min(threads, n) - 1);
    active_ = std::min(threads, n) - 1;
    task_ = task;
    arg_ = arg;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    running_.store(workers_, std::memory_order_relaxed);
    epoch_.fetch_add(1, std::memory_order_seq_cst);  // publishes the job
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work();
    while (running_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  static constexpr int64_t kSpinNs = 2000000;  // 2 ms of no work before a worker sleeps

  SpinPool() { pthread_atfork(nullptr, nullptr, [] { get().forget_workers(); }); }

  void forget_workers() {  // in a fork()ed child: the workers did not come along
    new (&busy_) std::mutex();
    new (&sleep_mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    workers_ = 0;
    sleeping_.store(0);
    running_.store(0);
  }

  void work() {
    for (size_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) task_(arg_, i);
  }

  void ensure_workers(size_t want) {
    // Workers are never stopped: a loop that wants fewer (the thread count went down) leaves the
    // extra ones out (they see the job, take no task and report done).
    while (workers_ < want) {
      std::thread([this, index = workers_, seen = epoch_.load()]() mutable { worker(index, seen); }).detach();
      ++workers_;
    }
  }

  void worker(size_t index, uint64_t seen) {
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      uint64_t e;
      for (int spins = 0; (e = epoch_.load(std::memory_order_acquire)) == seen; ++spins) {
        _mm_pause();
        if ((spins & 255) == 255 &&
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - idle_since).count() > kSpinNs) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return epoch_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_relaxed);
          idle_since = std::chrono::steady_clock::now();
        }
      }
      seen = e;
      if (index < active_) work();
      running_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex busy_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  size_t workers_ = 0;
  size_t active_ = 0;  // workers taking part in the current loop
  pthreadpool_task_1d_t task_ = nullptr;
  void* arg_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  std::atomic<size_t> running_{0};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleeping_{0};
};

// task(arg, 0 .. n-1): on our pool, with as many threads as ExecuTorch's pool has, when
// `parallel`; else here, in order.
inline void run_tasks(pthreadpool_task_1d_t task, void* arg, size_t n, bool parallel) {
  const size_t threads = parallel ? pool_threads() : 1;
  if (threads > 1 && n > 1) {
    SpinPool::get().run(task, arg, n, threads);
  } else {
    for (size_t i = 0; i < n; ++i) task(arg, i);
  }
}

// ET_TRANSFORMERS_NO_AVX512=1 keeps the kernels on their AVX2 paths on a CPU that has AVX-512 (to
// compare them, and to test the AVX2 paths there); read once, when the library loads.
inline bool avx512_disabled() {
  static const bool disabled = std::getenv("ET_TRANSFORMERS_NO_AVX512") != nullptr;
  return disabled;
}

// fn(begin, end) over [0, rows) in chunks: on the pool for a prefill-sized call (kParallelRows rows
// or more), else here in one call; a row's result never depends on which chunk computed it.
constexpr size_t kParallelRows = 16;
template <class F>
void for_rows(size_t rows, F&& fn) {
  const size_t threads = pool_threads();
  if (rows < kParallelRows || threads <= 1) {
    fn(size_t{0}, rows);
    return;
  }
  struct Chunks {
    F* fn;
    size_t rows, per;
  } chunks{&fn, rows, (rows + threads * 2 - 1) / (threads * 2)};
  run_tasks([](void* arg, size_t t) {
    const Chunks& c = *static_cast<const Chunks*>(arg);
    const size_t begin = t * c.per;
    if (begin < c.rows) (*c.fn)(begin, std::min(c.rows, begin + c.per));
  }, &chunks, (rows + chunks.per - 1) / chunks.per, true);
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
