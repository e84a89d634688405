// int4 weights x int8 activations for decode (W4A8, the activation quantized per call).
//
// y[m, n] = sum_k w[n, k] * xd[m, k], where
//   w[n, k]  = s[n, j] * q[n, k] + mn[n, j]     (q in 0..15, j = k / group; s, mn fp16)
//   xd[m, k] = dx[m, b] * xq[m, k]              (xq in -127..127, b = k / 32, dx = amax / 127)
// so each 32-block is an integer dot product of unsigned codes with signed int8 activations
// (AVX512-VNNI vpdpbusd: 64 products per instruction), scaled once, plus mn times the block's
// activation sum. The weight bytes read per token are half a byte a weight plus 4 bytes a group:
// decode at batch 1 is bound by reading them, and this reads them once for up to 8 input rows.
//
// Weight layout (int4.py's ``nibbles``): byte i of a row holds the code of k = 2i in its low
// nibble and of k = 2i + 1 in its high nibble. A 128-weight chunk is one 64-byte load; its low
// nibbles are the 64 even k and its high nibbles the 64 odd k, so the activations are stored in
// the same order per chunk (evens, then odds) and both halves add into one vector of 16 int32
// sums: lane l holds 4 products of 32-block l / 4 of the chunk, whichever half they came from.
// One int->float conversion and one scaled add then cover 128 weights. A last 64-weight chunk
// (K = 576 is 4.5 chunks) is done the same way on 32 bytes, 8 lanes, lane l in block l / 4.
//
// K must be a multiple of 64 and the group 32, 64 or 128 (Python checks before choosing this).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FLEETLM_INT4_Q8_VNNI 1
#endif

#include "cpu_common.h"

namespace {

constexpr int64_t kChunk = 128;
constexpr int64_t kMaxTile = 8;
constexpr int64_t kPrefetchRows = 4;

// Where the code of input k sits in a quantized row: per chunk (128, or the last 64), its even k
// first, then its odd k.
inline int64_t code_index(int64_t k) {
  const int64_t c0 = k / kChunk * kChunk, i = k - c0;
  return c0 + (i % 2) * 64 + i / 2;  // a 64-weight tail: evens at 0..31, odds at 64..95 (gap unused)
}

// The activations of one input row, quantized: codes in chunk order (a tail chunk padded to 128),
// the 16 lane scales of each chunk (dx of the lane's 32-block), and per weight group the sum of
// its dequantized activations.
struct QuantRow {
  std::vector<int8_t> codes;     // [chunks * 128]
  std::vector<float> lane_dx;    // [chunks * 16]
  std::vector<float> group_sum;  // [G]
};

template <typename T>
void quantize_row(const T* x, int64_t K, int64_t group, QuantRow& out) {
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  out.codes.assign(chunks * kChunk, 0);
  out.lane_dx.assign(chunks * 16, 0.f);
  out.group_sum.assign(K / group, 0.f);
  for (int64_t b = 0; b < K / 32; ++b) {
    float amax = 0.f;
    for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(fleetlm_cpu::to_float(x[b * 32 + i])));
    const float dx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < 32; ++i) {
      const int64_t k = b * 32 + i;
      const auto q = static_cast<int8_t>(std::nearbyint(fleetlm_cpu::to_float(x[k]) * inv));
      out.codes[code_index(k)] = q;
      sum += q;
    }
    out.group_sum[b * 32 / group] += dx * static_cast<float>(sum);
    const int64_t c = b * 32 / kChunk, lane0 = (b * 32 % kChunk) / 32 * 4;
    for (int64_t l = 0; l < 4; ++l) out.lane_dx[c * 16 + lane0 + l] = dx;
  }
}

// One tile of input rows, as raw pointers (the kernel's loops read no containers).
struct Tile {
  int64_t size = 0;
  const int8_t* codes[8];
  const float* lane_dx[8];
  const float* group_sum[8];
};

#if FLEETLM_INT4_Q8_VNNI
// The weight scale of each lane of the chunk at input k0 (lane l: 32-block l / 4, fp16 -> float).
template <int kGroup>
inline __m512 lane_scales(const c10::Half* s, int64_t k0) {
  constexpr int n = kChunk / kGroup;  // groups in the chunk: 4, 2 or 1
  const __m128 v = _mm_cvtph_ps(_mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), s + k0 / kGroup));
  if constexpr (kGroup == 128) {
    return _mm512_broadcastss_ps(v);
  } else if constexpr (kGroup == 64) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(v));
  } else {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(v));
  }
}

// R weight rows (wb bytes and G groups apart) against T input rows: the sums over the chunks, plus
// the group minimums times the activations' group sums, into out[r][t].
template <int R, int T, int kGroup>
__attribute__((always_inline)) inline void rows_block(const uint8_t* w, const c10::Half* s, const c10::Half* mn,
                                                      int64_t wb, const Tile& x, int64_t K, float (*out)[kMaxTile]) {
  const int64_t G = K / kGroup;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t full = K / kChunk;
  for (int64_t c = 0; c < full; ++c) {
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_loadu_si512(w + r * wb + c * 64);
      const __m512i lo = _mm512_and_si512(b, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      const __m512 sv = lane_scales<kGroup>(s + r * G, c * kChunk);
      for (int t = 0; t < T; ++t) {
        const int8_t* xq = x.codes[t] + c * kChunk;
        __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
        dp = _mm512_dpbusd_epi32(dp, hi, _mm512_loadu_si512(xq + 64));
        const __m512 scale = _mm512_mul_ps(sv, _mm512_loadu_ps(x.lane_dx[t] + c * 16));
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc[r][t]);
      }
    }
  }
  if (K % kChunk) {  // the last 64 weights: 8 lanes, lane l in 32-block l / 4
    const int64_t k0 = full * kChunk;
    const __m256i low8 = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; ++r) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * wb + k0 / 2));
      const __m256i lo = _mm256_and_si256(b, low8), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low8);
      __m256 sv;
      if constexpr (kGroup == 32) {
        const __m128 v = _mm_cvtph_ps(_mm_maskz_loadu_epi16(__mmask8(0x3), s + r * G + k0 / kGroup));
        sv = _mm256_permutexvar_ps(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_castps128_ps256(v));
      } else {  // 64 (a group of 128 divides K, so it leaves no tail)
        sv = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_maskz_loadu_epi16(__mmask8(0x1), s + r * G + k0 / kGroup)));
      }
      for (int t = 0; t < T; ++t) {
        const int8_t* xq = x.codes[t] + k0;
        __m256i dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo,
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
        dp = _mm256_dpbusd_epi32(dp, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64)));
        const __m256 scale = _mm256_mul_ps(sv, _mm256_loadu_ps(x.lane_dx[t] + full * 16));
        const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dp), scale);
        acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_castps256_ps512(part));  // the cast's upper half is zero
      }
    }
  }
  for (int64_t j = 0; j < G; j += 16) {
    const __mmask16 k = G - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (G - j)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + r * G + j));
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, x.group_sum[t] + j), acc[r][t]);
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

// Weight rows [begin, end) against one tile of T input rows, into y (rows of stride N): four weight
// rows at a time for one or two input rows (their sums reduced together), else one.
template <typename O, int T, int kGroup>
void rows_dot(const uint8_t* wp, const c10::Half* sp, const c10::Half* mp, const Tile& x, int64_t K, int64_t begin,
              int64_t end, O* y, int64_t N) {
  constexpr int R = T <= 2 ? 4 : 1;
  const int64_t G = K / kGroup, wb = K / 2;
  float out[4][kMaxTile];
  int64_t n = begin;
  for (; n < end; n += R) {
    const int64_t ahead = n + kPrefetchRows;  // the rows ahead, so their loads overlap this block's math
    if (ahead + R <= end) {
      for (int64_t off = 0; off < R * wb; off += 64) _mm_prefetch(reinterpret_cast<const char*>(wp + ahead * wb + off), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(sp + ahead * G), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mp + ahead * G), _MM_HINT_T0);
    }
    if (n + R <= end) {
      rows_block<R, T, kGroup>(wp + n * wb, sp + n * G, mp + n * G, wb, x, K, out);
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) y[t * N + n + r] = static_cast<O>(out[r][t]);
    } else {
      for (int64_t m = n; m < end; ++m) {
        rows_block<1, T, kGroup>(wp + m * wb, sp + m * G, mp + m * G, wb, x, K, out);
        for (int t = 0; t < T; ++t) y[t * N + m] = static_cast<O>(out[0][t]);
      }
    }
  }
}

template <typename O, int kGroup>
void tile_rows(const uint8_t* wp, const c10::Half* sp, const c10::Half* mp, const Tile& x, int64_t K, int64_t begin,
               int64_t end, O* y, int64_t N) {
  switch (x.size) {
    case 8: return rows_dot<O, 8, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    case 7: return rows_dot<O, 7, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    case 6: return rows_dot<O, 6, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    case 5: return rows_dot<O, 5, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    case 4: return rows_dot<O, 4, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    case 3: return rows_dot<O, 3, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    case 2: return rows_dot<O, 2, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
    default: return rows_dot<O, 1, kGroup>(wp, sp, mp, x, K, begin, end, y, N);
  }
}
#endif

// The same sum one weight at a time (machines without AVX512-VNNI; tests of the semantics).
void row_dot_portable(const uint8_t* w, const c10::Half* s, const c10::Half* mn, const Tile& x, int64_t K,
                      int64_t group, float* out) {
  for (int64_t t = 0; t < x.size; ++t) {
    float total = 0.f;
    for (int64_t j = 0; j < K / group; ++j) total += static_cast<float>(mn[j]) * x.group_sum[t][j];
    for (int64_t k = 0; k < K; ++k) {
      const int code = k % 2 ? w[k / 2] >> 4 : w[k / 2] & 0x0F;
      const int64_t lane = (k % kChunk) / 32 * 4;
      total += code * x.codes[t][code_index(k)] * static_cast<float>(s[k / group]) *
               x.lane_dx[t][k / kChunk * 16 + lane];
    }
    out[t] = total;
  }
}

template <typename T>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& scales,
                          const torch::Tensor& mins, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = nibbles.size(0), G = K / group;
  std::vector<QuantRow> rows(M);
  const T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, group, rows[m]);
  const uint8_t* wp = nibbles.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* mp = mins.data_ptr<c10::Half>();
  auto y = torch::empty({M, N}, x.options());
  T* yp = y.data_ptr<T>();
  std::vector<Tile> tiles;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
    Tile tile;
    tile.size = std::min(kMaxTile, M - m0);
    for (int64_t t = 0; t < tile.size; ++t) {
      tile.codes[t] = rows[m0 + t].codes.data();
      tile.lane_dx[t] = rows[m0 + t].lane_dx.data();
      tile.group_sum[t] = rows[m0 + t].group_sum.data();
    }
    tiles.push_back(tile);
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < tiles.size(); ++i) {
      T* out = yp + static_cast<int64_t>(i) * kMaxTile * N;
#if FLEETLM_INT4_Q8_VNNI
      if (group == 32) tile_rows<T, 32>(wp, sp, mp, tiles[i], K, begin, end, out, N);
      else if (group == 64) tile_rows<T, 64>(wp, sp, mp, tiles[i], K, begin, end, out, N);
      else tile_rows<T, 128>(wp, sp, mp, tiles[i], K, begin, end, out, N);
#else
      for (int64_t n = begin; n < end; ++n) {
        float o[kMaxTile];
        row_dot_portable(wp + n * (K / 2), sp + n * G, mp + n * G, tiles[i], K, group, o);
        for (int64_t t = 0; t < tiles[i].size; ++t) out[t * N + n] = static_cast<T>(o[t]);
      }
#endif
    }
  });
  return y;
}

}  // namespace

// x [M, K] fp32 or bf16; nibbles [N, K/2] uint8; scales, mins [N, K/group] fp16 -> y [M, N] in x's dtype.
torch::Tensor int4_q8_linear(torch::Tensor x, torch::Tensor nibbles, torch::Tensor scales, torch::Tensor mins,
                             int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_q8_linear: x must be 2-D and contiguous");
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "int4_q8_linear: group 32, 64 or 128, got ", group);
  const int64_t K = x.size(1), N = nibbles.size(0);
  TORCH_CHECK(K % 64 == 0, "int4_q8_linear: K must be a multiple of 64, got ", K);
  TORCH_CHECK(nibbles.scalar_type() == torch::kUInt8 && nibbles.is_contiguous() && nibbles.dim() == 2 &&
                  nibbles.size(1) == K / 2, "int4_q8_linear: nibbles uint8 [N, K/2]");
  for (const auto* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == torch::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == K / group, "int4_q8_linear: scales and mins fp16 [N, K/group]");
  if (x.scalar_type() == torch::kBFloat16) return linear_impl<at::BFloat16>(x, nibbles, scales, mins, group);
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "int4_q8_linear: x fp32 or bf16");
  return linear_impl<float>(x, nibbles, scales, mins, group);
}

// The path int4_q8_linear and int8_q8_linear were compiled for; Python uses them only with VNNI.
std::string q8_isa() {
#if FLEETLM_INT4_Q8_VNNI
  return "avx512vnni";
#else
  return "portable";
#endif
}
