// Group-wise int8 weights (GGUF Q8_0, Q6_K as loaded) x int8 activations for decode (W8A8, the
// activation quantized per call).
//
// y[m, n] = sum_k s[n, k / group] * q[n, k] * dx[m, k / 32] * xq[m, k], q and xq in -127..127
// (xq = round(x * 127 / amax) per 32 inputs, dx = amax / 127), group 16, 32, or K (one scale per
// output row: the ``int8`` format and its LM head). AVX512-VNNI's
// vpdpbusd multiplies unsigned by signed bytes, so the codes are read as q + 128 (one xor with
// 0x80) and the 128 * sum(xq) that adds is taken off by starting each sum at -128 * sum(xq) of its
// four inputs (computed once per call). 64 weights are one load; lane l of the 16 int32 sums
// holds inputs 4l..4l+3 of the chunk: 32-block l / 8, weight group 4l / group.
//
// K must be a multiple of 64 (Python checks before choosing this).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu_common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FLEETLM_INT8_Q8_VNNI 1
#endif

namespace {

constexpr int64_t kMaxTile = 8;
constexpr int64_t kPrefetchRows = 4;

// One input row quantized: codes in input order, per 64-chunk the 16 lane scales (dx of the
// lane's block) and the 16 starting sums (-128 x the lane's four codes).
struct QuantRow {
  std::vector<int8_t> codes;
  std::vector<float> lane_dx;
  std::vector<int32_t> lane_start;
};

template <typename T>
void quantize_row(const T* x, int64_t K, QuantRow& out) {
  out.codes.assign(K, 0);
  out.lane_dx.assign(K / 64 * 16, 0.f);
  out.lane_start.assign(K / 64 * 16, 0);
  for (int64_t b = 0; b < K / 32; ++b) {
    float amax = 0.f;
    for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(fleetlm_cpu::to_float(x[b * 32 + i])));
    const float dx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = 0; i < 32; ++i) {
      const int64_t k = b * 32 + i;
      out.codes[k] = static_cast<int8_t>(std::nearbyint(fleetlm_cpu::to_float(x[k]) * inv));
      out.lane_start[k / 4] -= 128 * out.codes[k];  // lane k / 4 of chunk k / 64 is entry k / 4
      out.lane_dx[k / 4] = dx;
    }
  }
}

struct Tile {
  int64_t size = 0;
  const int8_t* codes[kMaxTile];
  const float* lane_dx[kMaxTile];
  const int32_t* lane_start[kMaxTile];
};

#if FLEETLM_INT8_Q8_VNNI
// Scales per weight row: K / group, or 1 for a per-row scale (kGroup 0).
template <int kGroup>
constexpr int64_t groups(int64_t K) { return kGroup ? K / kGroup : 1; }

// The weight scale of each lane of the chunk at input k0.
template <int kGroup>
inline __m512 lane_scales(const float* s, int64_t k0) {
  if constexpr (kGroup == 0) {
    return _mm512_set1_ps(s[0]);
  } else if constexpr (kGroup == 32) {
    const __m128 v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s + k0 / 32)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(v));
  } else {  // 16
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(s + k0 / 16)));
  }
}

// R weight rows (K codes and K / group scales apart) against T input rows, into out[r][t].
template <int R, int T, int kGroup>
__attribute__((always_inline)) inline void rows_block(const int8_t* w, const float* s, const Tile& x, int64_t K,
                                                      float (*out)[kMaxTile]) {
  const int64_t G = groups<kGroup>(K);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < K / 64; ++c) {
    for (int r = 0; r < R; ++r) {
      const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w + r * K + c * 64), flip);  // q + 128
      const __m512 sv = lane_scales<kGroup>(s + r * G, c * 64);
      for (int t = 0; t < T; ++t) {
        const __m512i dp = _mm512_dpbusd_epi32(_mm512_loadu_si512(x.lane_start[t] + c * 16), u,
                                               _mm512_loadu_si512(x.codes[t] + c * 64));
        const __m512 scale = _mm512_mul_ps(sv, _mm512_loadu_ps(x.lane_dx[t] + c * 16));
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc[r][t]);
      }
    }
  }
  if constexpr (R == 4) {
    for (int t = 0; t < T; ++t) {
      float v[4];
      _mm_storeu_ps(v, fleetlm_cpu::reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
      for (int r = 0; r < 4; ++r) out[r][t] = v[r];
    }
  } else {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
  }
}

// Weight rows [begin, end) against one tile, into y (rows of stride N): four weight rows at a time
// for one or two input rows, else one.
template <typename O, int T, int kGroup>
void rows_dot(const int8_t* wp, const float* sp, const Tile& x, int64_t K, int64_t begin, int64_t end, O* y,
              int64_t N) {
  constexpr int R = T <= 2 ? 4 : 1;
  const int64_t G = groups<kGroup>(K);
  float out[4][kMaxTile];
  for (int64_t n = begin; n < end; n += R) {
    const int64_t ahead = n + kPrefetchRows;  // the rows ahead, so their loads overlap this block's math
    if (ahead + R <= end) {
      for (int64_t off = 0; off < R * K; off += 64) _mm_prefetch(reinterpret_cast<const char*>(wp + ahead * K + off), _MM_HINT_T0);
      for (int64_t off = 0; off < R * G; off += 16) _mm_prefetch(reinterpret_cast<const char*>(sp + ahead * G + off), _MM_HINT_T0);
    }
    if (n + R <= end) {
      rows_block<R, T, kGroup>(wp + n * K, sp + n * G, x, K, out);
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) y[t * N + n + r] = static_cast<O>(out[r][t]);
    } else {
      for (int64_t m = n; m < end; ++m) {
        rows_block<1, T, kGroup>(wp + m * K, sp + m * G, x, K, out);
        for (int t = 0; t < T; ++t) y[t * N + m] = static_cast<O>(out[0][t]);
      }
    }
  }
}

template <typename O, int kGroup>
void tile_rows(const int8_t* wp, const float* sp, const Tile& x, int64_t K, int64_t begin, int64_t end, O* y,
               int64_t N) {
  switch (x.size) {
    case 8: return rows_dot<O, 8, kGroup>(wp, sp, x, K, begin, end, y, N);
    case 7: return rows_dot<O, 7, kGroup>(wp, sp, x, K, begin, end, y, N);
    case 6: return rows_dot<O, 6, kGroup>(wp, sp, x, K, begin, end, y, N);
    case 5: return rows_dot<O, 5, kGroup>(wp, sp, x, K, begin, end, y, N);
    case 4: return rows_dot<O, 4, kGroup>(wp, sp, x, K, begin, end, y, N);
    case 3: return rows_dot<O, 3, kGroup>(wp, sp, x, K, begin, end, y, N);
    case 2: return rows_dot<O, 2, kGroup>(wp, sp, x, K, begin, end, y, N);
    default: return rows_dot<O, 1, kGroup>(wp, sp, x, K, begin, end, y, N);
  }
}
#endif

// The same sum one weight at a time (machines without AVX512-VNNI; tests of the semantics).
template <typename O>
void rows_portable(const int8_t* wp, const float* sp, const Tile& x, int64_t K, int64_t group, int64_t begin,
                   int64_t end, O* y, int64_t N) {
  for (int64_t n = begin; n < end; ++n)
    for (int64_t t = 0; t < x.size; ++t) {
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k)
        total += static_cast<float>(wp[n * K + k]) * x.codes[t][k] * sp[n * (K / group) + k / group] *
                 x.lane_dx[t][k / 4];
      y[t * N + n] = static_cast<O>(total);
    }
}

template <typename T>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  std::vector<QuantRow> rows(M);
  for (int64_t m = 0; m < M; ++m) quantize_row(x.data_ptr<T>() + m * K, K, rows[m]);
  std::vector<Tile> tiles;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
    Tile tile;
    tile.size = std::min(kMaxTile, M - m0);
    for (int64_t t = 0; t < tile.size; ++t) {
      tile.codes[t] = rows[m0 + t].codes.data();
      tile.lane_dx[t] = rows[m0 + t].lane_dx.data();
      tile.lane_start[t] = rows[m0 + t].lane_start.data();
    }
    tiles.push_back(tile);
  }
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  auto y = torch::empty({M, N}, x.options());
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N, std::max<int64_t>(4, (int64_t(1) << 14) / K), [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < tiles.size(); ++i) {
      T* out = yp + static_cast<int64_t>(i) * kMaxTile * N;
#if FLEETLM_INT8_Q8_VNNI
      if (group == K) tile_rows<T, 0>(wp, sp, tiles[i], K, begin, end, out, N);
      else if (group == 32) tile_rows<T, 32>(wp, sp, tiles[i], K, begin, end, out, N);
      else tile_rows<T, 16>(wp, sp, tiles[i], K, begin, end, out, N);
#else
      rows_portable(wp, sp, tiles[i], K, group, begin, end, out, N);
#endif
    }
  });
  return y;
}

}  // namespace

// x [M, K] fp32 or bf16; q [N, K] int8; s [N, K/group] fp32 (group K: [N, 1]) -> y [M, N] in x's dtype.
torch::Tensor int8_q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int8_q8_linear: x must be 2-D and contiguous");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(group == 16 || group == 32 || group == K, "int8_q8_linear: group 16, 32 or K (per row), got ", group);
  TORCH_CHECK(K % 64 == 0, "int8_q8_linear: K must be a multiple of 64, got ", K);
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) == K,
              "int8_q8_linear: q int8 [N, K]");
  TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == N &&
                  s.size(1) == K / group, "int8_q8_linear: s fp32 [N, K/group]");
  if (x.scalar_type() == torch::kBFloat16) return linear_impl<at::BFloat16>(x, q, s, group);
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "int8_q8_linear: x fp32 or bf16");
  return linear_impl<float>(x, q, s, group);
}
