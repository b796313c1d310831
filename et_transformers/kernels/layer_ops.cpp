// The small per-layer operators of a decoder between its GEMMs, for programs built with our kernels:
// et_transformers::rms_norm, ::rope and ::silu_mul. Each is one pass over a few thousand floats per
// token. As XNNPACK delegates they cost a delegate call each (~25 us at two threads: XNNPACK lets the
// pool's workers sleep after every call, and waking them is most of the cost), so they run here:
// on the calling thread for a decode step, split by rows over our pool for a prefill.
//
// rms_norm(x [..., D], weight [D], eps, unit_offset): y = x * (1 / sqrt(mean(x^2) + eps)) * w, with
//   w = 1 + weight when unit_offset (Gemma's form), else weight.
// rope(x [B, S, H, D], cos [B, S, D], sin [B, S, D]): x * cos + rotate_half(x) * sin, transformers'
//   apply_rotary_pos_emb in [batch, seq, heads, dim] order, bit for bit (the same products and sums).
// silu_mul(gate [..., N], up [..., N]): gate * sigmoid(gate) * up.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_common.h"

namespace {

using namespace et_transformers_kernels;
using executorch::runtime::Error;
using executorch::runtime::resize_tensor;

bool float_tensors(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (t->scalar_type() != ScalarType::Float) return false;
  return true;
}

void rms_norm_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  OpScope scope(ctx.internal_event_tracer(), "et_transformers::rms_norm.out");
  const Tensor& x = stack[0]->toTensor();
  const Tensor& weight = stack[1]->toTensor();
  const float eps = static_cast<float>(stack[2]->toDouble());
  const bool unit_offset = stack[3]->toBool();
  Tensor& out = stack[4]->toTensor();
  ET_KERNEL_CHECK_MSG(ctx, float_tensors({&x, &weight, &out}), InvalidArgument, , "et_transformers::rms_norm: float32 only");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(x.dim() - 1), InvalidArgument, ,
                      "et_transformers::rms_norm: weight must be [D] for x [..., D]");
  ET_KERNEL_CHECK(ctx, resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, );
  const int D = static_cast<int>(weight.size(0));
  const size_t rows = D ? x.numel() / D : 0;
  const float* xp = x.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f);
  for_rows(rows, [&](size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; ++r) {
    const float* xr = xp + r * D;
    float* yr = y + r * D;
    __m256 acc = _mm256_setzero_ps();
    int d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 v = _mm256_loadu_ps(xr + d);
      acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float sum = hsum(acc);
    for (; d < D; ++d) sum += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(D) + eps);
    const __m256 vi = _mm256_set1_ps(inv);
    for (d = 0; d + 8 <= D; d += 8) {
      __m256 wv = _mm256_loadu_ps(w + d);
      if (unit_offset) wv = _mm256_add_ps(one, wv);
      _mm256_storeu_ps(yr + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), vi), wv));
    }
    for (; d < D; ++d) yr[d] = (xr[d] * inv) * (unit_offset ? 1.f + w[d] : w[d]);
  }
  });
}

void rope_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  OpScope scope(ctx.internal_event_tracer(), "et_transformers::rope.out");
  const Tensor& x = stack[0]->toTensor();
  const Tensor& cos_t = stack[1]->toTensor();
  const Tensor& sin_t = stack[2]->toTensor();
  Tensor& out = stack[3]->toTensor();
  ET_KERNEL_CHECK_MSG(ctx, float_tensors({&x, &cos_t, &sin_t, &out}), InvalidArgument, , "et_transformers::rope: float32 only");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 4 && cos_t.dim() == 3 && sin_t.dim() == 3 && x.size(3) % 2 == 0, InvalidArgument, ,
                      "et_transformers::rope: x [B, S, H, D] (D even), cos/sin [B, S, D]");
  const int B = static_cast<int>(x.size(0)), S = static_cast<int>(x.size(1)), H = static_cast<int>(x.size(2)),
            D = static_cast<int>(x.size(3));
  for (const Tensor* t : {&cos_t, &sin_t})
    ET_KERNEL_CHECK_MSG(ctx, t->size(0) == B && t->size(1) == S && t->size(2) == D, InvalidArgument, ,
                        "et_transformers::rope: cos/sin must be [B, S, D] for x [B, S, H, D]");
  ET_KERNEL_CHECK(ctx, resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, );
  const int half = D / 2;
  const float* xp = x.const_data_ptr<float>();
  const float* cp = cos_t.const_data_ptr<float>();
  const float* sp = sin_t.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  for_rows(static_cast<size_t>(B) * S, [&](size_t r0, size_t r1) {
  for (size_t bs = r0; bs < r1; ++bs) {
    const float* c = cp + static_cast<size_t>(bs) * D;
    const float* s = sp + static_cast<size_t>(bs) * D;
    for (int h = 0; h < H; ++h) {
      const size_t base = (static_cast<size_t>(bs) * H + h) * D;
      const float* xr = xp + base;
      float* yr = y + base;
      int i = 0;
      // first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin (no FMA: two roundings)
      for (; i + 8 <= half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(xr + i), x2 = _mm256_loadu_ps(xr + half + i);
        _mm256_storeu_ps(yr + i, _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)),
                                               _mm256_mul_ps(x2, _mm256_loadu_ps(s + i))));
        _mm256_storeu_ps(yr + half + i, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                                      _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i))));
      }
      for (; i < half; ++i) {
        const float x1 = xr[i], x2 = xr[half + i];
        yr[i] = x1 * c[i] - x2 * s[i];
        yr[half + i] = x2 * c[half + i] + x1 * s[half + i];
      }
    }
  }
  });
}

void silu_mul_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  OpScope scope(ctx.internal_event_tracer(), "et_transformers::silu_mul.out");
  const Tensor& gate = stack[0]->toTensor();
  const Tensor& up = stack[1]->toTensor();
  Tensor& out = stack[2]->toTensor();
  ET_KERNEL_CHECK_MSG(ctx, float_tensors({&gate, &up, &out}), InvalidArgument, , "et_transformers::silu_mul: float32 only");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::tensors_have_same_shape(gate, up), InvalidArgument, ,
                      "et_transformers::silu_mul: gate and up must have the same shape");
  ET_KERNEL_CHECK(ctx, resize_tensor(out, gate.sizes()) == Error::Ok, InvalidArgument, );
  const int N = gate.dim() ? static_cast<int>(gate.size(gate.dim() - 1)) : 1;
  const size_t rows = N ? gate.numel() / N : 0;
  const float* g = gate.const_data_ptr<float>();
  const float* u = up.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  auto eight = [&](const float* gp, const float* upp, float* yp) {
    const __m256 gv = _mm256_loadu_ps(gp);
    const __m256 e = exp_clamped(_mm256_xor_ps(gv, sign));  // e^-g
    _mm256_storeu_ps(yp, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(upp)));
  };
  // Row by row, the tail through the same vector code: an element's value depends only on its own
  // inputs, never on how many rows share the call (decode and verify steps agree).
  for_rows(rows, [&](size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; ++r) {
    const size_t base = r * N;
    int i = 0;
    for (; i + 8 <= N; i += 8) eight(g + base + i, u + base + i, y + base + i);
    if (i < N) {
      float gt[8] = {0}, ut[8] = {0}, yt[8];
      std::memcpy(gt, g + base + i, sizeof(float) * (N - i));
      std::memcpy(ut, u + base + i, sizeof(float) * (N - i));
      eight(gt, ut, yt);
      std::memcpy(y + base + i, yt, sizeof(float) * (N - i));
    }
  }
  });
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("et_transformers::rms_norm.out", rms_norm_out),
    executorch::runtime::Kernel("et_transformers::rope.out", rope_out),
    executorch::runtime::Kernel("et_transformers::silu_mul.out", silu_mul_out),
};
const KernelRegistrar registrar0(kKernels[0]);
const KernelRegistrar registrar1(kKernels[1]);
const KernelRegistrar registrar2(kKernels[2]);

}  // namespace
