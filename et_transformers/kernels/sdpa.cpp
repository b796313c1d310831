// et_transformers::sdpa: causal attention of S queries over a static KV cache, for programs built
// with our kernels. q [B, S, H, D], k_cache / v_cache [B, T, Hkv, D] (H a multiple of Hkv, grouped
// query attention), all float32; query s attends to cache positions 0 .. start_pos + s. Returns
// [B, S, H, D]. The same contract as ExecuTorch's llama::custom_sdpa without a mask; written for
// the one-token decode step, where that kernel's setup dominates: dot products over the cache rows,
// a vectorised exp, and one pass of scaled accumulation of the value rows. With AVX2 (D a multiple
// of 8) a task takes a block of rows (a few queries x a kv head's query heads) so each cache row
// read serves all of them; with AVX-512 a task is one (batch, query, head) row. Tasks are split
// over the pool's threads, in decode too.
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
  int queries_per_task;  // block8(): each task takes these many queries ...
  int heads_per_task;    // ... times these many heads of one kv head
};

// scores[0, n) -> their softmax numerators exp(s - max), in place; returns 1 / their sum. scores
// must have room for 8 more floats (set to -inf: padding lanes whose exp is 0).
inline float softmax_numerators(float* scores, int n) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int t = 0;
  for (; t + 8 <= n; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(scores + t));
  float mx = hmax(vmax);
  for (; t < n; ++t) mx = std::max(mx, scores[t]);
  for (int i = n; i < n + 8; ++i) scores[i] = -INFINITY;
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (t = 0; t < n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vm));
    _mm256_storeu_ps(scores + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  return 1.f / hsum(vsum);
}

// One (batch, query, head) row, for D not a multiple of 8.
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
  const float inv = softmax_numerators(scores.data(), n);
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

// Lane sums of 8 registers: lane i of the result is the sum of a[i]'s 8 lanes, by one fixed tree
// (pairs within each half, then each half's four, then the two halves).
inline __m256 lane_sums8(const __m256* a) {
  __m256 x[4];
  for (int i = 0; i < 4; ++i)
    x[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  const __m256 y0 = _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], 0x88), _mm256_shuffle_ps(x[0], x[1], 0xDD));
  const __m256 y1 = _mm256_add_ps(_mm256_shuffle_ps(x[2], x[3], 0x88), _mm256_shuffle_ps(x[2], x[3], 0xDD));
  return _mm256_add_ps(_mm256_permute2f128_ps(y0, y1, 0x20), _mm256_permute2f128_ps(y0, y1, 0x31));
}

// The AVX2 form for D a multiple of 8: one task takes a block of rows, a few queries times a few
// heads of one kv head, so every key and value row read from the cache serves all of them (one
// row at a time re-read each cache row from L2 per head and query, and that traffic, not the
// arithmetic, bound a prefill's attention). Each row's arithmetic is the same whatever block it
// is in: its dots 8 keys at a time (key t in lane t mod 8, a chain over the 8-float chunks in its
// own register, lane_sums8's tree), the softmax of row(), and its value rows accumulated in key
// order, one chain per 8 floats; so a position's output does not depend on the call.
constexpr int kKeysPerStep = 8;
constexpr int kValueBlock = 16;  // value rows per pass over the block's rows

void block8(const Job& j, size_t index, std::vector<float>& buf) {
  const int D = j.D;
  const int G = j.H / j.Hkv;
  const int hgroups = j.H / j.heads_per_task;
  const int sblocks = (j.S + j.queries_per_task - 1) / j.queries_per_task;
  const int h0 = static_cast<int>(index % hgroups) * j.heads_per_task;
  const int s0 = static_cast<int>((index / hgroups) % sblocks) * j.queries_per_task;
  const int b = static_cast<int>(index / (static_cast<size_t>(hgroups) * sblocks));
  const int nh = j.heads_per_task;
  const int nq = std::min(j.queries_per_task, j.S - s0);
  const int R = nq * nh;  // row r: query s0 + r / nh, head h0 + r % nh
  const int kvh = h0 / G;
  const int nmax = static_cast<int>(j.start_pos) + s0 + nq;  // keys of the block's last query
  const int ld = (nmax + kKeysPerStep - 1) / kKeysPerStep * kKeysPerStep + kKeysPerStep;
  buf.resize(static_cast<size_t>(R) * (ld + D));
  float* scores = buf.data();                           // [R, ld]
  float* acc_buf = buf.data() + static_cast<size_t>(R) * ld;  // [R, D]
  const size_t stride = static_cast<size_t>(j.Hkv) * D;
  const float* k = j.k + static_cast<size_t>(b) * j.T * stride + static_cast<size_t>(kvh) * D;
  const float* v = j.v + static_cast<size_t>(b) * j.T * stride + static_cast<size_t>(kvh) * D;
  auto keys = [&](int r) { return static_cast<int>(j.start_pos) + s0 + r / nh + 1; };
  auto offset = [&](int r) { return ((static_cast<size_t>(b) * j.S + s0 + r / nh) * j.H + h0 + r % nh) * D; };
  // scores = scale * q . k_t
  const __m256 scale = _mm256_set1_ps(j.scale);
  for (int t0 = 0; t0 < nmax; t0 += kKeysPerStep) {
    const float* kt[kKeysPerStep];
    for (int i = 0; i < kKeysPerStep; ++i) kt[i] = k + static_cast<size_t>(std::min(t0 + i, nmax - 1)) * stride;  // past n: any valid row
    for (int r = 0; r < R; ++r) {
      if (t0 >= keys(r)) continue;
      const float* q = j.q + offset(r);
      __m256 acc[kKeysPerStep];
      const __m256 q0 = _mm256_loadu_ps(q);
      for (int i = 0; i < kKeysPerStep; ++i) acc[i] = _mm256_mul_ps(q0, _mm256_loadu_ps(kt[i]));
      for (int d = 8; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int i = 0; i < kKeysPerStep; ++i) acc[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kt[i] + d), acc[i]);
      }
      _mm256_storeu_ps(scores + static_cast<size_t>(r) * ld + t0, _mm256_mul_ps(lane_sums8(acc), scale));
    }
  }
  // softmax numerators per row; the sums' reciprocals kept for the end
  float inv[64];  // R <= 64 (queries_per_task * heads_per_task, bounded in sdpa_out)
  for (int r = 0; r < R; ++r) inv[r] = softmax_numerators(scores + static_cast<size_t>(r) * ld, keys(r));
  // out = sum_t p_t v_t / sum, the value rows in blocks that every row of the block uses in turn
  std::fill(acc_buf, acc_buf + static_cast<size_t>(R) * D, 0.f);
  for (int u0 = 0; u0 < nmax; u0 += kValueBlock) {
    for (int r = 0; r < R; ++r) {
      const int u1 = std::min(u0 + kValueBlock, keys(r));
      if (u0 >= u1) continue;
      const float* sr = scores + static_cast<size_t>(r) * ld;
      float* ar = acc_buf + static_cast<size_t>(r) * D;
      for (int d0 = 0; d0 < D; d0 += 64) {
        if (D - d0 >= 64) {
          __m256 acc[8];
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(ar + d0 + 8 * i);
          for (int u = u0; u < u1; ++u) {
            const __m256 p = _mm256_set1_ps(sr[u]);
            const float* vt = v + u * stride + d0;
            for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * i), acc[i]);
          }
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(ar + d0 + 8 * i, acc[i]);
        } else {
          for (int d = d0; d < D; d += 8) {
            __m256 acc = _mm256_loadu_ps(ar + d);
            for (int u = u0; u < u1; ++u) acc = _mm256_fmadd_ps(_mm256_set1_ps(sr[u]), _mm256_loadu_ps(v + u * stride + d), acc);
            _mm256_storeu_ps(ar + d, acc);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 vi = _mm256_set1_ps(inv[r]);
    const float* ar = acc_buf + static_cast<size_t>(r) * D;
    float* out = j.out + offset(r);
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(ar + d), vi));
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

// Which form computes a call (the same for every call with this D, so decode and prefill agree).
enum class Form { kRow512, kBlock8, kRow };
Form form_for(int D) {
  if (kAvx512 && D % 16 == 0 && D <= 256) return Form::kRow512;
  return D % 8 == 0 ? Form::kBlock8 : Form::kRow;
}

void task(void* arg, size_t index) {
  thread_local std::vector<float> scores;
  const Job& j = *static_cast<const Job*>(arg);
  switch (form_for(j.D)) {
    case Form::kRow512: return row512(j, index, scores);
    case Form::kBlock8: return block8(j, index, scores);
    case Form::kRow: return row(j, index, scores);
  }
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
        v.const_data_ptr<float>(), nullptr, 1, 1};
  ET_KERNEL_CHECK_MSG(ctx, j.Hkv > 0 && j.H % j.Hkv == 0 && k.size(3) == j.D && v.size(1) == j.T &&
                               v.size(2) == j.Hkv && v.size(3) == j.D && k.size(0) == j.B && v.size(0) == j.B,
                      InvalidArgument, , "et_transformers::sdpa: cache shapes do not match q");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + j.S <= j.T, InvalidArgument, ,
                      "et_transformers::sdpa: start_pos + S exceeds the cache");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, );
  j.out = out.mutable_data_ptr<float>();
  size_t tasks = static_cast<size_t>(j.B) * j.S * j.H;  // one row each
  if (form_for(j.D) == Form::kBlock8) {
    // Blocks of up to 4 queries x a kv head's query heads; a decode step with fewer such blocks
    // than two per thread takes one head per task instead, so the threads stay busy.
    const size_t threads = pool_threads();
    j.queries_per_task = std::min(j.S, 4);
    j.heads_per_task = j.H / j.Hkv;
    if (j.heads_per_task > 16 ||
        static_cast<size_t>(j.B) * j.Hkv * ((j.S + j.queries_per_task - 1) / j.queries_per_task) < 2 * threads)
      j.heads_per_task = 1;
    tasks = static_cast<size_t>(j.B) * (j.H / j.heads_per_task) * ((j.S + j.queries_per_task - 1) / j.queries_per_task);
  }
  run_tasks(task, &j, tasks, true);
}

const executorch::runtime::Kernel kKernel("et_transformers::sdpa.out", sdpa_out);
const KernelRegistrar registrar(kKernel);

}  // namespace
