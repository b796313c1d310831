// et_transformers::sdpa: causal attention of S queries over a static KV cache, for programs built
// with our kernels. q [B, S, H, D], k_cache / v_cache [B, T, Hkv, D] (H a multiple of Hkv, grouped
// query attention), all float32; query s attends to cache positions 0 .. start_pos + s. Returns
// [B, S, H, D]. The same contract as ExecuTorch's llama::custom_sdpa without a mask; written for
// the one-token decode step, where that kernel's setup dominates: one pass of AVX2 dot products over
// the cache rows, a vectorised exp, and one pass of scaled accumulation of the value rows; the
// (batch, query, head) rows are split over the pool's threads, in decode too.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_common.h"

namespace {

using namespace et_transformers_kernels;

struct Job {
  int B, S, H, Hkv, D, T;
  int64_t start_pos;
  float scale;
  const float* q;
  const float* k;
  const float* v;
  float* out;
};

// One (batch, query, head) row.
void row(const Job& j, size_t index, std::vector<float>& scores) {
  const int h = static_cast<int>(index % j.H);
  const int s = static_cast<int>((index / j.H) % j.S);
  const int b = static_cast<int>(index / (static_cast<size_t>(j.H) * j.S));
  const int kvh = h / (j.H / j.Hkv);
  const int n = static_cast<int>(j.start_pos) + s + 1;
  const int D = j.D;
  const float* q = j.q + ((static_cast<size_t>(b) * j.S + s) * j.H + h) * D;
  const size_t stride = static_cast<size_t>(j.Hkv) * D;
  const float* k = j.k + static_cast<size_t>(b) * j.T * stride + static_cast<size_t>(kvh) * D;
  const float* v = j.v + static_cast<size_t>(b) * j.T * stride + static_cast<size_t>(kvh) * D;
  float* out = j.out + ((static_cast<size_t>(b) * j.S + s) * j.H + h) * D;
  scores.resize(static_cast<size_t>(n) + 8);
  // scores = scale * q . k_t
  for (int t = 0; t < n; ++t) {
    const float* kt = k + t * stride;
    __m256 acc = _mm256_setzero_ps();
    int d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kt + d), acc);
    float dot = hsum(acc);
    for (; d < D; ++d) dot += q[d] * kt[d];
    scores[t] = dot * j.scale;
  }
  // softmax numerators and their sum
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int t = 0;
  for (; t + 8 <= n; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(&scores[t]));
  float mx = hmax(vmax);
  for (; t < n; ++t) mx = std::max(mx, scores[t]);
  for (int i = n; i < n + 8; ++i) scores[i] = -INFINITY;  // padding: exp gives 0
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (t = 0; t < n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(&scores[t]), vm));
    _mm256_storeu_ps(&scores[t], e);
    vsum = _mm256_add_ps(vsum, e);
  }
  const float inv = 1.f / hsum(vsum);
  // out = sum_t p_t v_t / sum
  for (int d0 = 0; d0 < D; d0 += 64) {
    const int width = std::min(64, D - d0);
    if (width == 64) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int u = 0; u < n; ++u) {
        const __m256 p = _mm256_set1_ps(scores[u]);
        const float* vt = v + u * stride + d0;
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * i), acc[i]);
      }
      const __m256 vi = _mm256_set1_ps(inv);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + d0 + 8 * i, _mm256_mul_ps(acc[i], vi));
    } else {
      for (int d = d0; d < d0 + width; ++d) {
        float acc = 0.f;
        for (int u = 0; u < n; ++u) acc += scores[u] * v[u * stride + d];
        out[d] = acc * inv;
      }
    }
  }
}

void task(void* arg, size_t index) {
  thread_local std::vector<float> scores;
  row(*static_cast<const Job*>(arg), index, scores);
}

void sdpa_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  OpScope scope(ctx.internal_event_tracer(), "et_transformers::sdpa.out");
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const int64_t start_pos = stack[3]->toInt();
  const double scale = stack[4]->toDouble();
  Tensor& out = stack[5]->toTensor();
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && k.scalar_type() == ScalarType::Float &&
                               v.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, , "et_transformers::sdpa: float32 tensors only");
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k.dim() == 4 && v.dim() == 4, InvalidArgument, ,
                      "et_transformers::sdpa: q [B, S, H, D], caches [B, T, Hkv, D]");
  Job j{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
        static_cast<int>(k.size(2)), static_cast<int>(q.size(3)), static_cast<int>(k.size(1)),
        start_pos, static_cast<float>(scale), q.const_data_ptr<float>(), k.const_data_ptr<float>(),
        v.const_data_ptr<float>(), nullptr};
  ET_KERNEL_CHECK_MSG(ctx, j.Hkv > 0 && j.H % j.Hkv == 0 && k.size(3) == j.D && v.size(1) == j.T &&
                               v.size(2) == j.Hkv && v.size(3) == j.D && k.size(0) == j.B && v.size(0) == j.B,
                      InvalidArgument, , "et_transformers::sdpa: cache shapes do not match q");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + j.S <= j.T, InvalidArgument, ,
                      "et_transformers::sdpa: start_pos + S exceeds the cache");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, );
  j.out = out.mutable_data_ptr<float>();
  run_tasks(task, &j, static_cast<size_t>(j.B) * j.S * j.H, true);
}

const executorch::runtime::Kernel kKernel("et_transformers::sdpa.out", sdpa_out);
const KernelRegistrar registrar(kKernel);

}  // namespace
