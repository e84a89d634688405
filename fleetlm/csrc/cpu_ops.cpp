// Fused elementwise ops (RMSNorm, RoPE, SiLU-and-mul) and quantized-weight kernels for the CPU.
// The paged decode attention kernel is csrc/paged_decode.cpp, the bf16 GEMV csrc/gemv.cpp; all
// are compiled into one module (fleetlm/ops.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using fleetlm_cpu::to_float;

// ---------------------------------------------------------------------------------------------
// Fused elementwise ops for bf16/fp16 models. Rows are processed inline when the tensor is
// small (a decode step), so no idle thread has to be woken for a few microseconds of work.
namespace {

constexpr int64_t kInlineElems = 1 << 16;

inline int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, kInlineElems / row_elems); }

template <typename T>
void add_rms_norm_rows(T* x, T* residual, const T* w, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * n;
      T* rr = residual ? residual + r * n : nullptr;
      float ss = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        float v = to_float(xr[i]);
        if (rr) {
          v += to_float(rr[i]);
          rr[i] = static_cast<T>(v);
          v = to_float(rr[i]);  // the stored (rounded) residual is what the reference normalizes
        }
        buf[i] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / n + eps);
      for (int64_t i = 0; i < n; ++i) xr[i] = static_cast<T>(buf[i] * inv * to_float(w[i]));
    }
  });
}

template <typename T>
void rope_rows(T* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t d, const T* cos,
               const T* sin_signed, const int64_t* pos) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, row_grain(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + pos[r] * d;
      const T* s = sin_signed + pos[r] * d;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + r * row_stride + h * d;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(v[i]), b = to_float(v[i + half]);
          v[i] = static_cast<T>(a * to_float(c[i]) + b * to_float(s[i]));
          v[i + half] = static_cast<T>(b * to_float(c[i + half]) + a * to_float(s[i + half]));
        }
      }
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * n;
      const T* u = g + n;
      T* o = out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float a = to_float(g[i]);
        o[i] = static_cast<T>(a / (1.f + std::exp(-a)) * to_float(u[i]));
      }
    }
  });
}

}  // namespace

// x [T, n] normalized in place; if residual is given, residual += x first (in place) and the
// sum is normalized. weight [n].
void add_rms_norm_(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "add_rms_norm_: contiguous tensors required");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    add_rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), res, weight.data_ptr<scalar_t>(), rows, n,
                                static_cast<float>(eps));
  });
}

// Rotates the first `heads` heads of each row of x [T, >= heads*d] (row stride x.stride(0)) in
// place; cos / sin_signed [max_pos, d] (sin with its first half negated); positions [T] int64.
void rope_(torch::Tensor x, int64_t heads, int64_t d, torch::Tensor cos, torch::Tensor sin_signed,
           torch::Tensor positions) {
  TORCH_CHECK(x.stride(1) == 1 && cos.is_contiguous() && sin_signed.is_contiguous(), "rope_: bad strides");
  auto pos = positions.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.stride(0), heads, d, cos.data_ptr<scalar_t>(),
                        sin_signed.data_ptr<scalar_t>(), pos.data_ptr<int64_t>());
  });
}

// gate_up [T, 2n] -> silu(gate) * up [T, n]
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous(), "silu_and_mul: contiguous input required");
  const int64_t n = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * n);
  auto out = torch::empty({rows, n}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

namespace {
// out[m] = sum_g s[g] * sum_k q[g*GS + k] * x[m][g*GS + k] for one weight row and M input rows
// (row stride K): each block of 16 codes is widened once and used for all M rows.
template <int M>
void int8_group_rows(const int8_t* q, const float* s, const float* x, int64_t K, int64_t G, int64_t GS,
                     float* out) {
#if defined(__AVX512F__)
  if (GS % 16 == 0) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t k = g * GS; k < (g + 1) * GS; k += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        for (int m = 0; m < M; ++m) part[m] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + m * K + k), part[m]);
      }
      const __m512 sc = _mm512_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(sc, part[m], acc[m]);
    }
    for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
    return;
  }
#endif
  for (int m = 0; m < M; ++m) {
    float total = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float d = 0.f;
      for (int64_t k = g * GS; k < (g + 1) * GS; ++k) d += static_cast<float>(q[k]) * x[m * K + k];
      total += s[g] * d;
    }
    out[m] = total;
  }
}

// Rows of x in tiles of up to 4 (the widened codes are reused within a tile).
void int8_group_row(const int8_t* q, const float* s, const float* x, int64_t M, int64_t K, int64_t G, int64_t GS,
                    float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int8_group_rows<4>(q, s, x + m * K, K, G, GS, out + m);
  switch (M - m) {
    case 3: return int8_group_rows<3>(q, s, x + m * K, K, G, GS, out + m);
    case 2: return int8_group_rows<2>(q, s, x + m * K, K, G, GS, out + m);
    case 1: return int8_group_rows<1>(q, s, x + m * K, K, G, GS, out + m);
    default: return;
  }
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Group-wise int8 weights (GGUF Q8_0): y[m, n] = sum_g s[n, g] * sum_k q[n, g*GS + k] * x[m, g*GS + k].
// x [M, K] float32, q [N, K] int8, s [N, K/GS] float32 -> y [M, N] float32. AVX-512: int8 widened
// to float in registers once per block for up to four input rows, one FMA per 16 weights and
// row, the group's scale applied once per group.
torch::Tensor int8_group_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && q.scalar_type() == torch::kChar && s.scalar_type() == torch::kFloat,
              "int8_group_linear: x float32, q int8, s float32");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous(), "int8_group_linear: contiguous tensors");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / group;
  TORCH_CHECK(q.size(1) == K && K % group == 0 && s.size(0) == N && s.size(1) == G && group <= 256,
              "int8_group_linear: shapes disagree");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> out(M);
    for (int64_t n = begin; n < end; ++n) {
      int8_group_row(qp + n * K, sp + n * G, xp, M, K, G, group, out.data());
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = out[m];
    }
  });
  return y;
}

// q [N, K] int8, s [N, K/group] float32 -> q * s [N, K] in `dtype` (one rounding from float32).
torch::Tensor int8_group_dequant(torch::Tensor q, torch::Tensor s, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(q.scalar_type() == torch::kChar && s.scalar_type() == torch::kFloat && q.is_contiguous() &&
                  s.is_contiguous() && q.size(1) % group == 0 && s.size(1) == q.size(1) / group,
              "int8_group_dequant: int8 codes and float32 scales, contiguous, matching groups");
  const int64_t N = q.size(0), K = q.size(1), G = K / group;
  auto out = torch::empty({N, K}, q.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "int8_group_dequant", [&] {
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kInlineElems / K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t g = 0; g < G; ++g) {
          const float sc = sp[n * G + g];
          for (int64_t k = g * group; k < (g + 1) * group; ++k)
            op[n * K + k] = static_cast<scalar_t>(static_cast<float>(qp[n * K + k]) * sc);
        }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Group-wise int4 weights, two codes per byte (low nibble = even column) -> the dense weight:
// w[n, k] = (q - 8) * scale + zero, computed in float32 and rounded once to the output dtype.
// nibbles [N, K/2] uint8, scales_zeros [K/group, N, 2] (any float dtype) -> [N, K] in `dtype`.
// One pass over the codes (what the dense GEMM path of prefill reads every step).
namespace {
template <typename SZ, typename O>
void int4_dequant_rows(const uint8_t* b, const SZ* sz, O* out, int64_t N, int64_t K, int64_t group,
                       int64_t begin, int64_t end) {
  const int64_t G = K / group;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = b + n * (K / 2);
    O* o = out + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const float scale = to_float(sz[(g * N + n) * 2]);
      const float zero = to_float(sz[(g * N + n) * 2 + 1]);
      const uint8_t* bg = row + g * group / 2;
      O* og = o + g * group;
      int64_t j = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<O, c10::BFloat16>) {  // 32 weights a step, the same rounding
        const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero), eight = _mm512_set1_ps(8.f);
        const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                    23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        for (; j + 16 <= group / 2; j += 16) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bg + j)));
          const __m512 lo = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), eight), s, z);
          const __m512 hi = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), eight), s, z);
          const __m512i w = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          _mm512_storeu_si512(og + 2 * j, w);
        }
      }
#endif
      for (; j < group / 2; ++j) {
        const uint8_t v = bg[j];
        og[2 * j] = static_cast<O>((static_cast<float>(v & 15) - 8.f) * scale + zero);
        og[2 * j + 1] = static_cast<O>((static_cast<float>(v >> 4) - 8.f) * scale + zero);
      }
    }
  }
}
}  // namespace

torch::Tensor int4_dequant(torch::Tensor nibbles, torch::Tensor scales_zeros, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(nibbles.scalar_type() == torch::kByte && nibbles.is_contiguous() && scales_zeros.is_contiguous(),
              "int4_dequant: contiguous uint8 nibbles and scales_zeros");
  const int64_t N = nibbles.size(0), K = nibbles.size(1) * 2;
  TORCH_CHECK(group % 2 == 0 && K % group == 0 && scales_zeros.size(0) == K / group && scales_zeros.size(1) == N &&
              scales_zeros.size(2) == 2, "int4_dequant: shapes disagree");
  auto out = torch::empty({N, K}, nibbles.options().dtype(dtype));
  const uint8_t* bp = nibbles.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, kInlineElems / K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scales_zeros.scalar_type(), "int4_dequant_sz", [&] {
    using SZ = scalar_t;
    const SZ* szp = scales_zeros.data_ptr<SZ>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "int4_dequant_out", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        int4_dequant_rows<SZ, scalar_t>(bp, szp, op, N, K, group, begin, end);
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// MXFP4 weights (OCP microscaling FP4, GGUF MXFP4): blocks of 32 weights along K, each an E2M1
// code (4 bits) with one E8M0 exponent byte per block. codes [N, K/2] uint8 in ggml's block order
// (byte j of a block's 16: low nibble = weight j, high nibble = weight j + 16), scales [N, K/32]
// uint8; both may be row-strided views (stride(1) == 1). ggml's convention, kept exactly:
// w = kvalue[code] * 2^(e - 128) with the doubled E2M1 values {0, 1, 2, 3, 4, 6, 8, 12} and
// their negatives. Every product is exact in float32 (and bf16).
namespace {
alignas(64) constexpr float kMxfp4Lut[16] = {0.f, 1.f, 2.f, 3.f, 4.f, 6.f, 8.f, 12.f,
                                             0.f, -1.f, -2.f, -3.f, -4.f, -6.f, -8.f, -12.f};

inline float e8m0_half(uint8_t e) {  // ggml_e8m0_to_fp32_half: 2^(e - 128), denormal below e = 2
  const uint32_t bits = e < 2 ? (uint32_t(0x00200000) << e) : (uint32_t(e - 1) << 23);
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Mxfp4Rows {
  const uint8_t* q;
  const uint8_t* e;
  int64_t q_stride, e_stride, NB;
};

// y[r * N] = sum_k w[k] * x[r * K + k] for R input rows and one weight row; each block is
// decoded once (a 16-entry LUT in one register, the scale applied to the weights) and used for
// all R rows.
template <int R>
inline void mxfp4_row_tile(const uint8_t* q, const uint8_t* e, int64_t NB, const float* x, int64_t K, float* y,
                           int64_t N) {
#if defined(__AVX512F__)
  const __m512 lut = _mm512_load_ps(kMxfp4Lut);
  const __m512i low = _mm512_set1_epi32(15);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16)));
    const __m512 d = _mm512_set1_ps(e8m0_half(e[b]));
    const __m512 wl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low), lut), d);
    const __m512 wh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), d);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * K + b * 32;
      acc[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xr), acc[r]);
      acc[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xr + 16), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = _mm512_reduce_add_ps(acc[r]);
#else
  float acc[R] = {};
  float w[32];
  for (int64_t b = 0; b < NB; ++b) {
    const float d = e8m0_half(e[b]);
    for (int j = 0; j < 16; ++j) {
      w[j] = kMxfp4Lut[q[b * 16 + j] & 15] * d;
      w[j + 16] = kMxfp4Lut[q[b * 16 + j] >> 4] * d;
    }
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * K + b * 32;
      float s = 0.f;
      for (int j = 0; j < 32; ++j) s += w[j] * xr[j];
      acc[r] += s;
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = acc[r];
#endif
}

inline void mxfp4_row(const Mxfp4Rows& w, int64_t n, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  const uint8_t* q = w.q + n * w.q_stride;
  const uint8_t* e = w.e + n * w.e_stride;
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) mxfp4_row_tile<8>(q, e, w.NB, x + m * K, K, y + m * N + n, N);
  const float* xm = x + m * K;
  float* ym = y + m * N + n;
  switch (M - m) {
    case 7: mxfp4_row_tile<7>(q, e, w.NB, xm, K, ym, N); break;
    case 6: mxfp4_row_tile<6>(q, e, w.NB, xm, K, ym, N); break;
    case 5: mxfp4_row_tile<5>(q, e, w.NB, xm, K, ym, N); break;
    case 4: mxfp4_row_tile<4>(q, e, w.NB, xm, K, ym, N); break;
    case 3: mxfp4_row_tile<3>(q, e, w.NB, xm, K, ym, N); break;
    case 2: mxfp4_row_tile<2>(q, e, w.NB, xm, K, ym, N); break;
    case 1: mxfp4_row_tile<1>(q, e, w.NB, xm, K, ym, N); break;
    default: break;
  }
}

Mxfp4Rows mxfp4_check(const torch::Tensor& codes, const torch::Tensor& scales, const char* what) {
  TORCH_CHECK(codes.scalar_type() == torch::kByte && scales.scalar_type() == torch::kByte, what,
              ": codes and scales must be uint8");
  TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2 && codes.size(0) == scales.size(0), what,
              ": codes [N, K/2] and scales [N, K/32] required");
  TORCH_CHECK(codes.size(1) == scales.size(1) * 16, what, ": codes [N, K/2] and scales [N, K/32] disagree (K = ",
              codes.size(1) * 2, ", ", scales.size(1), " blocks)");
  TORCH_CHECK((codes.size(1) == 0 || codes.stride(1) == 1) && (scales.size(1) == 0 || scales.stride(1) == 1), what,
              ": codes and scales rows must be contiguous");
  return {codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), codes.stride(0), scales.stride(0), scales.size(1)};
}
}  // namespace

// y = x @ w.T for few rows: x [M, K] float32 -> y [M, N] float32. Parallel over output rows.
torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "mxfp4_linear: x must be a contiguous float32 [M, K]");
  const Mxfp4Rows w = mxfp4_check(codes, scales, "mxfp4_linear");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K == w.NB * 32, "mxfp4_linear: x has ", K, " columns, the weight ", w.NB * 32);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) mxfp4_row(w, n, xp, M, K, yp, N);
  });
  return y;
}

// The dense weight [N, K] in `dtype` (for many rows: then the dtype's GEMM). Exact in float32 and
// bf16 (each weight is a small integer times a power of two).
torch::Tensor mxfp4_dequant(torch::Tensor codes, torch::Tensor scales, at::ScalarType dtype) {
  const Mxfp4Rows w = mxfp4_check(codes, scales, "mxfp4_dequant");
  const int64_t N = codes.size(0), K = w.NB * 32;
  auto out = torch::empty({N, K}, codes.options().dtype(dtype));
  if (N == 0 || K == 0) return out;
  const int64_t grain = std::max<int64_t>(1, kInlineElems / K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mxfp4_dequant", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[32];
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* q = w.q + n * w.q_stride;
        const uint8_t* e = w.e + n * w.e_stride;
        scalar_t* o = op + n * K;
        for (int64_t b = 0; b < w.NB; ++b) {
          const float d = e8m0_half(e[b]);
#if defined(__AVX512F__)
          const __m512 lut = _mm512_load_ps(kMxfp4Lut);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16)));
          const __m512 ds = _mm512_set1_ps(d);
          const __m512 wl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut), ds);
          const __m512 wh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), ds);
          if constexpr (std::is_same_v<scalar_t, float>) {
            _mm512_storeu_ps(o + b * 32, wl);
            _mm512_storeu_ps(o + b * 32 + 16, wh);
            continue;
          } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            // exact in bf16 (at most two significant bits): its upper half is the rounded value
            auto* ob = reinterpret_cast<__m256i*>(o + b * 32);
            _mm256_storeu_si256(ob, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(wl), 16)));
            _mm256_storeu_si256(ob + 1, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(wh), 16)));
            continue;
          }
          _mm512_store_ps(buf, wl);
          _mm512_store_ps(buf + 16, wh);
#else
          for (int j = 0; j < 16; ++j) {
            buf[j] = kMxfp4Lut[q[b * 16 + j] & 15] * d;
            buf[j + 16] = kMxfp4Lut[q[b * 16 + j] >> 4] * d;
          }
#endif
          for (int j = 0; j < 32; ++j) o[b * 32 + j] = static_cast<scalar_t>(buf[j]);
        }
      }
    });
  });
  return out;
}

// csrc/gemv.cpp and csrc/paged_decode.cpp (compiled into the same module)
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                           torch::Tensor seq_lens, double scale);
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
std::string gemv_isa();
torch::Tensor int4_q8_linear(torch::Tensor x, torch::Tensor nibbles, torch::Tensor scales, torch::Tensor mins,
                             int64_t group);
torch::Tensor int8_q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t group);
std::string q8_isa();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "x @ w.T (+ bias) in bf16 for up to 8 rows (decode GEMV)");
  m.def("gemv_isa", &gemv_isa, "the vector path bf16_gemv was compiled for");
  m.def("mxfp4_linear", &mxfp4_linear, "x @ (MXFP4 weights).T for few rows (LUT GEMV)");
  m.def("mxfp4_dequant", &mxfp4_dequant, "MXFP4 codes and e8m0 scales -> dense weight");
  m.def("int4_q8_linear", &int4_q8_linear, "x @ (int4 weights).T with x rounded to int8 per 32 (decode)");
  m.def("int8_q8_linear", &int8_q8_linear, "x @ (group-wise int8 weights).T with x rounded to int8 per 32 (decode)");
  m.def("q8_isa", &q8_isa, "the vector path int4_q8_linear and int8_q8_linear were compiled for");
  m.def("int4_dequant", &int4_dequant, "group-wise int4 nibbles -> dense weight (fp32 math, one rounding)");
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU)");
  m.def("add_rms_norm_", &add_rms_norm_, "in-place (residual add +) RMSNorm");
  m.def("rope_", &rope_, "in-place rotary embedding");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("int8_group_dequant", &int8_group_dequant, "group-wise int8 codes and scales -> dense weight");
  m.def("int8_group_linear", &int8_group_linear, "x @ (group-wise int8 weights).T (GGUF Q8_0)");
}
