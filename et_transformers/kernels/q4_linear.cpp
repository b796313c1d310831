// et_transformers::q4_linear: y = x @ W^T for 4-bit weights in groups of 32 (one fp16 scale per
// group), with the activations quantized per group of 32 to int8 (one fp32 scale per group), the
// arithmetic of llama.cpp's Q4_0 x Q8_0 dot product. Registered into ExecuTorch's kernel registry
// (libexecutorch.so) when this library is loaded, and parallelised on ExecuTorch's thread pool.
//
// Weight layout (built by et_transformers/kernels/ops.py's pack_q4): qweight uint8 [N/8, K/32, 128]:
// for each group of 8 output rows and each block of 32 inputs, 4 chunks of 32 bytes; byte 4r + t of
// chunk c holds row r's input 4c + t (+ 8) in its low nibble and input 16 + 4c + t (+ 8) in its high
// one. scales fp16 [N/8, K/32, 8].
//
// et_transformers::q4_linear_per_token: the same weights with the activations of torchao's 8da4w
// scheme (what XNNPACK's dynamically quantized linear computes): each row quantized to int8 with one
// scale and zero point (quantized_decomposed's choose_qparams_per_token_asymmetric and
// quantize_per_token, the same float operations), so the result is
//   y[n] = sum_b dot_b * (weight_scale_b * s) - (s * z) * weight_sums[n],
// weight_sums[n] = sum_b weight_scale_b * (sum of block b's int4 values) given with the weights: the
// zero point's term, one multiply per output instead of one per block.
//
// Every output element is computed by the same sequence of float operations whatever the number of
// rows M in the call, so a token's logits do not depend on how many tokens share the forward.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_common.h"

namespace {

using namespace et_transformers_kernels;

constexpr int kBlock = 32;
constexpr int kRows = 8;
constexpr int kBlockBytes = kRows * kBlock / 2;  // 8 rows x 32 inputs, two per byte

// One block's 32 int8 values (given as int32 in [-128, 127]) stored at q, and 8 x their sum at
// sum8 (the correction for the weights' +8 offset, ready to subtract: one broadcast load per row
// and block in the GEMM).
inline void store_block(const __m256i i32[4], int8_t* q, int32_t* sum8) {
  const __m256i s01 = _mm256_add_epi32(i32[0], i32[1]);
  const __m256i s23 = _mm256_add_epi32(i32[2], i32[3]);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(_mm256_add_epi32(s01, s23)), _mm256_extracti128_si256(_mm256_add_epi32(s01, s23), 1));
  t = _mm_hadd_epi32(t, t);
  t = _mm_hadd_epi32(t, t);
  // int32 -> int16 -> int8 packs interleave 128-bit lanes; the permute restores element order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]);
  const __m256i i16b = _mm256_packs_epi32(i32[2], i32[3]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16a, i16b), order));
  *sum8 = 8 * _mm_cvtsi128_si32(t);
}

// Quantize one row of K floats into K/32 int8 blocks: scale = max|x| / 127, q = nearest-even(x * (1 /
// scale)) (the conversion's default rounding), and 8 times the blocks' sums (store_block).
void quantize_row(const float* x, int K, int8_t* q, float* scale, int32_t* sum8) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.f;
    const __m256 id = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
    store_block(i32, q + b * kBlock, sum8 + b);
    scale[b] = d;
  }
}

// Quantize one row as quantized_decomposed's per-token asymmetric int8 does, with its float
// operations: scale s = max((max(x, 0) - min(x, 0)) / 255, eps) and zero point z from min/max in
// float32; q = clamp(round-half-even(double(x) * (1.0 / double(s)) + z), -128, 127) in double (the
// reference's promotion). Every block gets scale s (so the GEMM is q4_linear's) and 8 x its sum;
// zc = s * z, the zero point's coefficient. An all-zero row gets scale 0 (its outputs are +0).
void quantize_row_per_token(const float* x, int K, int8_t* q, float* scale, int32_t* sum8, float* zc) {
  __m256 vmin = _mm256_loadu_ps(x), vmax = vmin;
  for (int k = 8; k < K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vmin = _mm256_min_ps(vmin, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  float lo[8], hi[8];
  _mm256_storeu_ps(lo, vmin);
  _mm256_storeu_ps(hi, vmax);
  const float mn = std::min(*std::min_element(lo, lo + 8), 0.f);
  const float mx = std::max(*std::max_element(hi, hi + 8), 0.f);
  const int B = K / kBlock;
  if (mn == 0.f && mx == 0.f) {
    std::fill(scale, scale + B, 0.f);
    std::fill(sum8, sum8 + B, 0);
    std::memset(q, 0, static_cast<size_t>(K));
    *zc = 0.f;
    return;
  }
  const float s = std::max((mx - mn) / 255.f, std::numeric_limits<float>::epsilon());
  const float dmin = mn / s, dmax = mx / s;
  float z = (-128.f + dmin) + (127.f + dmax) > 0.f ? -128.f - dmin : 127.f - dmax;
  z = std::nearbyint(std::min(std::max(z, -128.f), 127.f));
  const __m256d inv = _mm256_set1_pd(1.0 / static_cast<double>(s));
  const __m256d zd = _mm256_set1_pd(static_cast<double>(z));
  const __m256i qmin = _mm256_set1_epi32(-128), qmax = _mm256_set1_epi32(127);
  for (int b = 0; b < B; ++b) {
    const float* xb = x + b * kBlock;
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 v = _mm256_loadu_ps(xb + 8 * i);
      const __m128i a = _mm256_cvtpd_epi32(_mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), inv), zd));
      const __m128i c = _mm256_cvtpd_epi32(_mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), inv), zd));
      i32[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_set_m128i(c, a), qmin), qmax);
    }
    store_block(i32, q + b * kBlock, sum8 + b);
    scale[b] = s;
  }
  *zc = s * z;
}

struct Job {
  int M, K, N;
  const uint8_t* w;
  const uint16_t* s;
  const int8_t* xq;    // [M, K]
  const float* xs;     // [M, K/32]
  const int32_t* xsum8; // [M, K/32]: 8 x each block's sum
  float* y;            // [M, N]
  size_t groups_per_task;
  const int* rows;     // the rows to compute (the others are all zero: their outputs are +0)
  int active;          // how many
  const float* zc;     // [M]: s * z per row (per-token activations), or nullptr (q4_linear)
  const float* wsum;   // [N]: weight_sums
};

// Output row `row`, columns [col, col + 8): acc, less the zero point's term in a per-token call.
inline void store8(const Job& j, int row, size_t col, __m256 acc) {
  if (j.wsum) acc = _mm256_sub_ps(acc, _mm256_mul_ps(_mm256_set1_ps(j.zc[row]), _mm256_loadu_ps(j.wsum + col)));
  _mm256_storeu_ps(j.y + static_cast<size_t>(row) * j.N + col, acc);
}

// Rows [g*8, g*8+8) of every computed output row m, for the groups g of task t. The 8 weight rows
// of a block sit in the 8 int32 lanes (4 consecutive inputs per lane), so one multiply-add of a
// broadcast activation quad serves all 8 rows and no horizontal sums are needed: per block, 8
// maddubs products are summed in int16 (|each| <= 2 * 15 * 127, so 8 of them stay below 2^15),
// widened once, and corrected for the weights' +8 offset: the exact integer dot of each row. Each
// weight block is unpacked once per tile of up to kTile activation rows. Every output element then
// sees the same float operations in the same order (block by block, no FMA) whatever M is.
constexpr int kTile = 4;

// The 4 int8 values at p in every 32-bit lane.
inline __m256i broadcast_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Weight bytes a call bound by reading its weights (one row: a decode step) asks for ahead of use
// (one row at one thread on Zen 2, a 32 MB matrix: 10.5 -> 14.2 GB/s; 512 and 4096 gained less).
constexpr int kPrefetch = 1024;

// Group g alone (a one-row call: the weights come as one stream, prefetched kPrefetch bytes ahead).
void one_group(const Job& j, size_t g) {
  const int B = j.K / kBlock;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wg = j.w + g * static_cast<size_t>(B) * kBlockBytes;
  const uint16_t* sg = j.s + g * static_cast<size_t>(B) * kRows;
  for (int i0 = 0; i0 < j.active; i0 += kTile) {
    const int tile = std::min(kTile, j.active - i0);
    const int* rows = j.rows + i0;
    __m256 acc[kTile];
    for (int i = 0; i < kTile; ++i) acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < B; ++b) {
      const uint8_t* wb = wg + static_cast<size_t>(b) * kBlockBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch + 64), _MM_HINT_T0);
      if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(sg + b * kRows + kPrefetch / 8), _MM_HINT_T0);
      __m256i w[8];  // quad q: inputs 4q .. 4q+3 of the 8 rows
      for (int c = 0; c < 4; ++c) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * c));
        w[c] = _mm256_and_si256(packed, m4);
        w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), m4);
      }
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + b * kRows)));
      for (int i = 0; i < tile; ++i) {
        const size_t row = static_cast<size_t>(rows[i]) * B + b;
        const int8_t* x = j.xq + row * kBlock;
        __m256i s16 = _mm256_maddubs_epi16(w[0], broadcast_quad(x));
        for (int q = 1; q < 8; ++q) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[q], broadcast_quad(x + 4 * q)));
        const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(j.xsum8[row]));
        const __m256 sc = _mm256_mul_ps(ws, _mm256_set1_ps(j.xs[row]));
        acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(dot), sc));  // the reference rounds twice too
      }
    }
    for (int i = 0; i < tile; ++i) store8(j, rows[i], g * kRows, acc[i]);
  }
}

// Groups g and g + 1 together (several rows: a prefill, a draft's verification), so each
// activation broadcast serves 16 output rows; a block's 32 bytes of weights per group are taken a
// chunk (inputs 4c.. and 16+4c..) at a time. The int16 partial sums are the same products added in
// another order (exact), and the float steps are one_group()'s: the same bits (1.2x the speed at
// 8-128 rows on Zen 2, where the one multiply-add pipe binds). Tiles of 3 rows: 6-7% faster there
// than 4 (registers), and than three groups x 2 rows.
constexpr int kPairTile = 3;
void two_groups(const Job& j, size_t g) {
  const int B = j.K / kBlock;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wg[2] = {j.w + g * static_cast<size_t>(B) * kBlockBytes, j.w + (g + 1) * static_cast<size_t>(B) * kBlockBytes};
  const uint16_t* sg[2] = {j.s + g * static_cast<size_t>(B) * kRows, j.s + (g + 1) * static_cast<size_t>(B) * kRows};
  for (int i0 = 0; i0 < j.active; i0 += kPairTile) {
    const int tile = std::min(kPairTile, j.active - i0);
    const int* rows = j.rows + i0;
    __m256 acc[kPairTile][2];
    for (int i = 0; i < kPairTile; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int b = 0; b < B; ++b) {
      __m256i s16[kPairTile][2];
      for (int c = 0; c < 4; ++c) {
        __m256i lo[2], hi[2];
        for (int v = 0; v < 2; ++v) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg[v] + static_cast<size_t>(b) * kBlockBytes + 32 * c));
          lo[v] = _mm256_and_si256(packed, m4);
          hi[v] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), m4);
        }
        for (int i = 0; i < kPairTile; ++i) {  // (a constant bound, so the sums stay in registers)
          if (i >= tile) break;
          const int8_t* x = j.xq + (static_cast<size_t>(rows[i]) * B + b) * kBlock;
          const __m256i xl = broadcast_quad(x + 4 * c), xh = broadcast_quad(x + 16 + 4 * c);
          for (int v = 0; v < 2; ++v) {
            const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo[v], xl), _mm256_maddubs_epi16(hi[v], xh));
            s16[i][v] = c ? _mm256_add_epi16(s16[i][v], t) : t;
          }
        }
      }
      __m256 ws[2];
      for (int v = 0; v < 2; ++v) ws[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg[v] + b * kRows)));
      for (int i = 0; i < tile; ++i) {
        const size_t row = static_cast<size_t>(rows[i]) * B + b;
        const __m256i correction = _mm256_set1_epi32(j.xsum8[row]);
        const __m256 xs = _mm256_set1_ps(j.xs[row]);
        for (int v = 0; v < 2; ++v) {
          const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(s16[i][v], ones), correction);
          acc[i][v] = _mm256_add_ps(acc[i][v], _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws[v], xs)));
        }
      }
    }
    for (int i = 0; i < tile; ++i)
      for (int v = 0; v < 2; ++v) store8(j, rows[i], (g + v) * kRows, acc[i][v]);
  }
}

void task(void* arg, size_t t) {
  const Job& j = *static_cast<const Job*>(arg);
  const size_t G = static_cast<size_t>(j.N / kRows);
  const size_t g1 = std::min(G, t * j.groups_per_task + j.groups_per_task);
  size_t g = t * j.groups_per_task;
  if (j.active > 1)
    for (; g + 2 <= g1; g += 2) two_groups(j, g);
  for (; g < g1; ++g) one_group(j, g);
}

// The same computation with AVX-512 VNNI, where the CPU has it (checked once, at load;
// ET_TRANSFORMERS_NO_AVX512 keeps the AVX2 path): vpdpbusd sums 4 u8 x s8 products into each int32
// lane in one instruction (the exact integer dot, as the maddubs path computes it). Several rows
// (a prefill, a draft's verification) take four groups at a time: a 512-bit register holds two
// consecutive groups (16 rows) of a block and each activation broadcast serves two registers, 32
// output rows. One row (a decode step) is bound by reading the weights from memory: it takes one
// group at a time in 256-bit registers, so the weights come as one sequential stream. Calls of up
// to kStreamRows rows prefetch their weights ahead. The float operations per output element are
// those of task(), in the same order, so every path gives the same bits.
constexpr int kTile512 = 8;
constexpr int kWide = 2;   // registers per row when several rows share a call (2 groups each)
constexpr int kWideTile = 8;  // rows per tile then
// Calls of up to kStreamRows rows (a decode step, a draft's verification) are bound by reading the
// weights: each group's weights and scales are asked for kPrefetch weight bytes ahead (one row:
// 26 -> 31-34 GB/s at two threads on a 134 MB matrix; 8 rows: 5.3 -> 2.8-4.7 ms there), and groups
// left over after the four-group sets are taken one at a time.
constexpr int kStreamRows = 8;
static_assert(kStreamRows <= kTile512, "a streamed call is one tile");
#define ET_VNNI512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

ET_VNNI512 inline int32_t quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The two register widths of the VNNI path: 16 lanes over groups g and g+1, or 8 over group g.
struct Lanes16 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kGroups = 2;
  ET_VNNI512 static I weights(const uint8_t* a, size_t group_stride) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + group_stride)), 1);
  }
  ET_VNNI512 static F scales(const uint16_t* a, size_t group_stride) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + group_stride)), 1));
  }
  ET_VNNI512 static I low_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  ET_VNNI512 static I high_nibbles(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  ET_VNNI512 static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  ET_VNNI512 static I dpbusd(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  ET_VNNI512 static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  ET_VNNI512 static F zero() { return _mm512_setzero_ps(); }
  ET_VNNI512 static F set1f(float v) { return _mm512_set1_ps(v); }
  ET_VNNI512 static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  ET_VNNI512 static F addf(F a, F b) { return _mm512_add_ps(a, b); }
  ET_VNNI512 static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  ET_VNNI512 static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  ET_VNNI512 static F subf(F a, F b) { return _mm512_sub_ps(a, b); }
  ET_VNNI512 static void store(float* y, F v) { _mm512_storeu_ps(y, v); }
};

struct Lanes8 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kGroups = 1;
  ET_VNNI512 static I weights(const uint8_t* a, size_t) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)); }
  ET_VNNI512 static F scales(const uint16_t* a, size_t) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))); }
  ET_VNNI512 static I low_nibbles(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
  ET_VNNI512 static I high_nibbles(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
  ET_VNNI512 static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  ET_VNNI512 static I dpbusd(I acc, I w, I x) { return _mm256_dpbusd_epi32(acc, w, x); }
  ET_VNNI512 static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  ET_VNNI512 static F zero() { return _mm256_setzero_ps(); }
  ET_VNNI512 static F set1f(float v) { return _mm256_set1_ps(v); }
  ET_VNNI512 static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  ET_VNNI512 static F addf(F a, F b) { return _mm256_add_ps(a, b); }
  ET_VNNI512 static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  ET_VNNI512 static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  ET_VNNI512 static F subf(F a, F b) { return _mm256_sub_ps(a, b); }
  ET_VNNI512 static void store(float* y, F v) { _mm256_storeu_ps(y, v); }
};

// Groups g .. g + NV * L::kGroups - 1 (output columns from g*8, contiguous) for one tile of up to
// T activation rows: NV registers per row, so each activation broadcast serves NV of them.
template <class L, int NV, int T>
ET_VNNI512 void vnni_tile(const Job& j, size_t g, const int* rows, int tile) {
  const int B = j.K / kBlock;
  const size_t wstride = static_cast<size_t>(B) * kBlockBytes;  // from one group to the next
  const size_t sstride = static_cast<size_t>(B) * kRows;
  const uint8_t* wg = j.w + g * wstride;
  const uint16_t* sg = j.s + g * sstride;
  typename L::F acc[T][NV];
  for (int i = 0; i < T; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = L::zero();
  for (int b = 0; b < B; ++b) {
    typename L::I w[NV][8];
    typename L::F ws[NV];
    for (int v = 0; v < NV; ++v) {
      const size_t group = static_cast<size_t>(v) * L::kGroups;
      const uint8_t* wb = wg + group * wstride + static_cast<size_t>(b) * kBlockBytes;
      if (tile <= kStreamRows) {
        for (int gi = 0; gi < L::kGroups; ++gi) {
          for (int line = 0; line < kBlockBytes; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(wb + gi * wstride + kPrefetch + line), _MM_HINT_T0);
          if ((b & 3) == 0)  // a 64-byte line holds 4 blocks' scales
            _mm_prefetch(reinterpret_cast<const char*>(sg + (group + gi) * sstride + b * kRows + kPrefetch / 8), _MM_HINT_T0);
        }
      }
      for (int c = 0; c < 4; ++c) {
        const typename L::I packed = L::weights(wb + 32 * c, wstride);
        w[v][c] = L::low_nibbles(packed);
        w[v][c + 4] = L::high_nibbles(packed);
      }
      ws[v] = L::scales(sg + group * sstride + b * kRows, sstride);
    }
    for (int i = 0; i < tile; ++i) {
      const size_t row = static_cast<size_t>(rows[i]) * B + b;
      const int8_t* x = j.xq + row * kBlock;
      // two chains per register (a short dependency chain for the one-row decode step), each
      // started from half the weights' +8 offset correction: exact integers in any order
      typename L::I d0[NV], d1[NV];
      const typename L::I offset = L::set1(-(j.xsum8[row] / 2));
      for (int v = 0; v < NV; ++v) d0[v] = d1[v] = offset;
      for (int q = 0; q < 8; q += 2) {
        const typename L::I x0 = L::set1(quad(x + 4 * q)), x1 = L::set1(quad(x + 4 * q + 4));
        for (int v = 0; v < NV; ++v) {
          d0[v] = L::dpbusd(d0[v], w[v][q], x0);
          d1[v] = L::dpbusd(d1[v], w[v][q + 1], x1);
        }
      }
      const typename L::F xs = L::set1f(j.xs[row]);
      for (int v = 0; v < NV; ++v)
        acc[i][v] = L::addf(acc[i][v], L::mul(L::to_float(L::add(d0[v], d1[v])), L::mul(ws[v], xs)));
    }
  }
  for (int i = 0; i < tile; ++i)
    for (int v = 0; v < NV; ++v) {
      const size_t col = (g + static_cast<size_t>(v) * L::kGroups) * kRows;
      typename L::F out = acc[i][v];
      if (j.wsum) out = L::subf(out, L::mul(L::set1f(j.zc[rows[i]]), L::loadf(j.wsum + col)));  // store8's steps
      L::store(j.y + static_cast<size_t>(rows[i]) * j.N + col, out);
    }
}

// Task t of the VNNI path: its groups, in sets of four for several rows, then one at a time for up
// to kStreamRows rows (all of them for one row), else in pairs.
ET_VNNI512 void task_vnni512(void* arg, size_t t) {
  const Job& j = *static_cast<const Job*>(arg);
  const size_t G = static_cast<size_t>(j.N / kRows);
  const size_t g0 = t * j.groups_per_task;
  const size_t g1 = std::min(G, g0 + j.groups_per_task);
  size_t g = g0;
  if (j.active > 1) {  // several rows: four groups at a time, each broadcast serving two registers
    for (; g + 2 * kWide <= g1; g += 2 * kWide)
      for (int i0 = 0; i0 < j.active; i0 += kWideTile)
        vnni_tile<Lanes16, kWide, kWideTile>(j, g, j.rows + i0, std::min(kWideTile, j.active - i0));
  }
  if (j.active <= kStreamRows) {  // one group at a time: one weight stream (for one row, a pair made two: 17 vs 29 GB/s)
    for (; g < g1; ++g) vnni_tile<Lanes8, 1, kTile512>(j, g, j.rows, j.active);
    return;
  }
  for (; g < g1; g += 2) {
    for (int i0 = 0; i0 < j.active; i0 += kTile512) {
      const int tile = std::min(kTile512, j.active - i0);
      if (g + 1 < g1)
        vnni_tile<Lanes16, 1, kTile512>(j, g, j.rows + i0, tile);
      else
        vnni_tile<Lanes8, 1, kTile512>(j, g, j.rows + i0, tile);
    }
  }
}

bool has_vnni512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
const bool kVnni512 = has_vnni512() && !avx512_disabled();

// Both operators: stack is (x, qweight, scales, out), or (x, qweight, scales, weight_sums, out) with
// per-token activations.
void run_q4(KernelRuntimeContext& ctx, Span<EValue*> stack, bool per_token) {
  const char* name = per_token ? "q4_linear_per_token" : "q4_linear";
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  const Tensor& s = stack[2]->toTensor();
  Tensor& out = stack[per_token ? 4 : 3]->toTensor();
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && w.scalar_type() == ScalarType::Byte &&
                               s.scalar_type() == ScalarType::Half && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, , "%s: expected float x, uint8 qweight, half scales, float out", name);
  ET_KERNEL_CHECK_MSG(ctx, w.dim() == 3 && w.size(2) == kBlockBytes, InvalidArgument, ,
                      "%s: qweight must be [N/8, K/32, 128] (a program built by an older et_transformers: "
                      "export it again)", name);
  const int N = static_cast<int>(w.size(0) * kRows);
  const int K = static_cast<int>(w.size(1) * kBlock);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.size(x.dim() - 1) == K, InvalidArgument, ,
                      "%s: x's last dim must be K", name);
  const float* wsum = nullptr;
  if (per_token) {
    const Tensor& ws = stack[3]->toTensor();
    ET_KERNEL_CHECK_MSG(ctx, ws.scalar_type() == ScalarType::Float && ws.numel() == N, InvalidArgument, ,
                        "%s: weight_sums must be float [N]", name);
    wsum = ws.const_data_ptr<float>();
  }
  const int M = static_cast<int>(x.numel() / K);
  executorch::aten::SizesType sizes[16];
  for (int i = 0; i < x.dim(); ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = N;
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) ==
                           executorch::runtime::Error::Ok, InvalidArgument, );
  const int B = K / kBlock;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs;
  thread_local std::vector<int32_t> xsum;
  thread_local std::vector<float> zc;
  xq.resize(static_cast<size_t>(M) * K);
  xs.resize(static_cast<size_t>(M) * B);
  xsum.resize(static_cast<size_t>(M) * B);
  zc.resize(static_cast<size_t>(M));
  const float* xp = x.const_data_ptr<float>();
  int8_t* xqp = xq.data();
  float* xsp = xs.data();
  int32_t* xsump = xsum.data();
  float* zcp = zc.data();
  for_rows(static_cast<size_t>(M), [&](size_t m0, size_t m1) {  // a prefill's rows split over the pool
    for (size_t m = m0; m < m1; ++m) {
      if (per_token)
        quantize_row_per_token(xp + m * K, K, xqp + m * K, xsp + m * B, xsump + m * B, zcp + m);
      else
        quantize_row(xp + m * K, K, xqp + m * K, xsp + m * B, xsump + m * B);
    }
  });
  // All-zero rows (the padding rows of a verifying program's head, on every decode step) give +0
  // whatever the weights (each term is dot * (scale * 0)): written here, not computed.
  thread_local std::vector<int> rows;
  rows.clear();
  float* y = out.mutable_data_ptr<float>();
  for (int m = 0; m < M; ++m) {
    const float* sm = xs.data() + static_cast<size_t>(m) * B;
    if (std::any_of(sm, sm + B, [](float v) { return v != 0.f; }))
      rows.push_back(m);
    else
      std::fill(y + static_cast<size_t>(m) * N, y + static_cast<size_t>(m + 1) * N, 0.f);
  }
  if (rows.empty()) return;
  Job job{M, K, N, w.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(s.const_data_ptr<executorch::aten::Half>()),
          xq.data(), xs.data(), xsum.data(), y, 0, rows.data(), static_cast<int>(rows.size()), zc.data(), wsum};
  const size_t threads = pool_threads();
  const size_t G = static_cast<size_t>(N / kRows);
  // A few tasks per thread so an unevenly loaded core does not hold the others back.
  const size_t tasks = std::min(G, threads > 1 ? threads * 4 : 1);
  job.groups_per_task = (G + tasks - 1) / tasks;
  // Each task but the last gets whole sets of the groups its path takes at a time: with AVX-512,
  // 2 * kWide groups for more than kStreamRows rows; with AVX2, two groups for more than one row.
  const int n_rows = static_cast<int>(rows.size());
  const size_t unit = kVnni512 ? (n_rows > kStreamRows ? 2 * kWide : 1) : (n_rows > 1 ? 2 : 1);
  job.groups_per_task = (job.groups_per_task + unit - 1) / unit * unit;
  run_tasks(kVnni512 ? task_vnni512 : task, &job, (G + job.groups_per_task - 1) / job.groups_per_task, true);
}

void q4_linear_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  OpScope scope(ctx.internal_event_tracer(), "et_transformers::q4_linear.out");
  run_q4(ctx, stack, false);
}

void q4_linear_per_token_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  OpScope scope(ctx.internal_event_tracer(), "et_transformers::q4_linear_per_token.out");
  run_q4(ctx, stack, true);
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("et_transformers::q4_linear.out", q4_linear_out),
    executorch::runtime::Kernel("et_transformers::q4_linear_per_token.out", q4_linear_per_token_out),
};
const KernelRegistrar registrar0(kKernels[0]);
const KernelRegistrar registrar1(kKernels[1]);

}  // namespace
