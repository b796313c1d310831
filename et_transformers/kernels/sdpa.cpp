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

// The AVX-512 form of row() for D a multiple of 16 (chosen once, at load, for every call, so a
// decode step and a longer forward compute a position alike): 16 keys' dot products at a time, each
// a chain over its 16-float chunks in its own register, then a transposing reduction network that
// sums every key's 16 lanes in one fixed tree and leaves the 16 dots in one register (key t sits in
// lane t mod 16 whatever the call); a 16-lane exp; value rows accumulated in two interleaved chains.
#define ET_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma,f16c")))

ET_AVX512 inline __m512 exp512_nonpositive(__m512 x) {  // exp_nonpositive() in 16 lanes
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

// Lane sums of 16 registers: lane j of the result is the sum of a[j]'s lanes.
ET_AVX512 inline __m512 reduce16(const __m512* a) {
  __m512 r1[8], r2[4], r3[2];
  for (int i = 0; i < 8; ++i)
    r1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    r2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], 0x88), _mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    r3[i] = _mm512_add_ps(_mm512_shuffle_ps(r2[2 * i], r2[2 * i + 1], 0x44), _mm512_shuffle_ps(r2[2 * i], r2[2 * i + 1], 0xEE));
  const __m512 r4 = _mm512_add_ps(_mm512_shuffle_ps(r3[0], r3[1], 0x88), _mm512_shuffle_ps(r3[0], r3[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r4);
}

ET_AVX512 void row512(const Job& j, size_t index, std::vector<float>& scores) {
  const int h = static_cast<int>(index % j.H);
  const int s = static_cast<int>((index / j.H) % j.S);
  const int b = static_cast<int>(index / (static_cast<size_t>(j.H) * j.S));
  const int kvh = h / (j.H / j.Hkv);
  const int n = static_cast<int>(j.start_pos) + s + 1;
  const int C = j.D / 16;  // chunks per row
  const float* qp = j.q + ((static_cast<size_t>(b) * j.S + s) * j.H + h) * j.D;
  const size_t stride = static_cast<size_t>(j.Hkv) * j.D;
  const float* k = j.k + static_cast<size_t>(b) * j.T * stride + static_cast<size_t>(kvh) * j.D;
  const float* v = j.v + static_cast<size_t>(b) * j.T * stride + static_cast<size_t>(kvh) * j.D;
  float* out = j.out + ((static_cast<size_t>(b) * j.S + s) * j.H + h) * j.D;
  const int padded = (n + 15) / 16 * 16;
  scores.resize(static_cast<size_t>(padded));
  constexpr int kMaxChunks = 16;  // D up to 256
  __m512 q[kMaxChunks];
  for (int c = 0; c < C; ++c) q[c] = _mm512_loadu_ps(qp + 16 * c);
  const __m512 scale = _mm512_set1_ps(j.scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int t0 = 0; t0 < padded; t0 += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) {
      const float* kt = k + static_cast<size_t>(std::min(t0 + i, n - 1)) * stride;  // past n: any valid row
      acc[i] = _mm512_mul_ps(q[0], _mm512_loadu_ps(kt));
      for (int c = 1; c < C; ++c) acc[i] = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(kt + 16 * c), acc[i]);
    }
    const __mmask16 valid = n - t0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t0)) - 1);
    const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(reduce16(acc), scale));
    _mm512_storeu_ps(&scores[t0], sc);
    vmax = _mm512_max_ps(vmax, sc);
  }
  const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int t0 = 0; t0 < padded; t0 += 16) {
    const __m512 e = exp512_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(&scores[t0]), vm));
    _mm512_storeu_ps(&scores[t0], e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  __m512 even[kMaxChunks], odd[kMaxChunks];
  for (int c = 0; c < C; ++c) even[c] = odd[c] = _mm512_setzero_ps();
  int u = 0;
  for (; u + 2 <= n; u += 2) {
    const __m512 p0 = _mm512_set1_ps(scores[u]), p1 = _mm512_set1_ps(scores[u + 1]);
    const float* v0 = v + static_cast<size_t>(u) * stride;
    for (int c = 0; c < C; ++c) {
      even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * c), even[c]);
      odd[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v0 + stride + 16 * c), odd[c]);
    }
  }
  if (u < n) {
    const __m512 p0 = _mm512_set1_ps(scores[u]);
    for (int c = 0; c < C; ++c) even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + static_cast<size_t>(u) * stride + 16 * c), even[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), inv));
}

bool use_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && !avx512_disabled();
}
const bool kAvx512 = use_avx512();

void task(void* arg, size_t index) {
  thread_local std::vector<float> scores;
  const Job& j = *static_cast<const Job*>(arg);
  if (kAvx512 && j.D % 16 == 0 && j.D <= 256)
    row512(j, index, scores);
  else
    row(j, index, scores);
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
