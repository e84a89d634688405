// Paged decode attention for the CPU: one query token per sequence, K/V read in place from the
// block table (no gather copy).
//
// Work items are (sequence, chunk of its context); within one, each KV head in turn with the G
// query heads that share it, so each cached K/V row is read once. A short batch with a long
// context (batch-1 decode) is split along the context, flash-decoding style, so both cores work
// on one sequence: each (sequence, KV head, chunk) keeps its own softmax max, sum and weighted V
// sum, and a second pass combines the chunks of each (sequence, KV head) exactly. Scores are float32; the
// softmax subtracts the max before the exponent.
//
// bf16 q and cache on AVX512-BF16 machines: dpbf16 dot products (q rounded to bf16, like the K it
// multiplies) for 16 tokens at a time, their horizontal sums taken together (one shuffle tree
// for 16 scores instead of 16 reductions). Other dtypes (fp32, fp16, int8 rows with an fp16
// scale, fp8 e4m3) take portable loops the compiler vectorizes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define FLEETLM_AVX512BF16 1
#endif

namespace {

using fleetlm_cpu::to_float;

struct Shape {
  int64_t H, Hkv, G, D, BS, max_blocks, tok_stride, blk_stride, v_offset;
  int64_t hs;    // elements from one head's row to the next (D, or D + 2 for an int8 cache)
  bool scaled;   // int8 cache: each head row ends with its fp16 scale (2 bytes)
};

// The dequantization scale of one cached head row (1 unless the cache is int8 with scales).
template <typename S>
inline float row_scale(const S* row, const Shape& s) {
  if (!s.scaled) return 1.f;
  c10::Half h;
  std::memcpy(&h, row + s.D, sizeof(h));
  return static_cast<float>(h);
}

// Asks for head h's rows of one block ahead of their use: blocks are scattered through the
// cache, so the hardware prefetcher cannot guess the next one.
template <typename S>
inline void prefetch_block(const S* base, int64_t rows, const Shape& s) {
  const int64_t bytes = s.hs * static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t off = 0; off < bytes; off += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(base + i * s.tok_stride) + off);
}

// Calls f(row pointer of token t's head h, t - t0) for t in [t0, t1), block by block.
template <typename S, typename F>
inline void for_rows(const S* kv, const int64_t* blocks, int64_t t0, int64_t t1, int64_t h, const Shape& s, F f) {
  for (int64_t blk = t0 / s.BS, t = t0; t < t1; ++blk) {
    const S* base = kv + blocks[blk] * s.blk_stride + h * s.hs;
    const int64_t end = std::min(t1, (blk + 1) * s.BS);
    if (end < t1) prefetch_block(kv + blocks[blk + 1] * s.blk_stride + h * s.hs, std::min(s.BS, t1 - end), s);
    for (int64_t i = t - blk * s.BS; t < end; ++t, ++i) f(base + i * s.tok_stride, t - t0);
  }
}

// sc[g * n + j] = q_g . k_(t0 + j) for the G query heads of KV head h (q already scaled).
template <typename S>
void scores_portable(const float* qf, const S* kv, const int64_t* blocks, int64_t t0, int64_t t1, int64_t h,
                     const Shape& s, float* sc) {
  const int64_t n = t1 - t0;
  for_rows(kv, blocks, t0, t1, h, s, [&](const S* k, int64_t j) {
    const float ks = row_scale(k, s);
    for (int64_t g = 0; g < s.G; ++g) {
      const float* qg = qf + g * s.D;
      float acc = 0.f;
      for (int64_t d = 0; d < s.D; ++d) acc += qg[d] * to_float(k[d]);
      sc[g * n + j] = acc * ks;
    }
  });
}

// In place: sc[g] <- exp(sc[g] - m[g]); m[g] = max of row g, l[g] = sum of its exponents.
void softmax_parts(float* sc, int64_t G, int64_t n, float* m, float* l) {
  for (int64_t g = 0; g < G; ++g) {
    float* x = sc + g * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, x[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      x[t] = std::exp(x[t] - mx);
      sum += x[t];
    }
    m[g] = mx;
    l[g] = sum;
  }
}

#ifdef FLEETLM_AVX512BF16
// v[0..15] -> one vector whose lane i is the sum of v[i]'s lanes.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// scores_portable for bf16 rows, D = 32 * C: 16 tokens at a time per query head, the 16
// accumulators in registers (a short last tile repeats its first row; the store is masked).
template <int C>
void scores_bf16(const float* qf, const c10::BFloat16* kv, const int64_t* blocks, int64_t t0, int64_t t1,
                 int64_t h, const Shape& s, float* sc) {
  const int64_t n = t1 - t0;
  std::vector<__m512bh> qb(s.G * C);
  for (int64_t i = 0; i < s.G * C; ++i)
    qb[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qf + i * 32 + 16), _mm512_loadu_ps(qf + i * 32));
  const c10::BFloat16* rows[16];
  int64_t filled = 0, first = 0;
  auto flush = [&]() {
    for (int64_t i = filled; i < 16; ++i) rows[i] = rows[0];
    for (int64_t g = 0; g < s.G; ++g) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < C; ++c)
          acc[i] = _mm512_dpbf16_ps(acc[i], qb[g * C + c], (__m512bh)_mm512_loadu_si512(rows[i] + c * 32));
      }
      _mm512_mask_storeu_ps(sc + g * n + first, (__mmask16)((1u << filled) - 1), hsum16(acc));
    }
    first += filled;
    filled = 0;
  };
  for_rows(kv, blocks, t0, t1, h, s, [&](const c10::BFloat16* k, int64_t) {
    rows[filled++] = k;
    if (filled == 16) flush();
  });
  if (filled) flush();
}

// pv_chunk for bf16 rows, D = 16 * C: each V row widened once into C registers; the
// accumulators of up to GB query heads stay in registers for the whole chunk.
template <int C>
void pv_bf16(const float* p, const c10::BFloat16* kv, const int64_t* blocks, int64_t t0, int64_t t1, int64_t h,
             const Shape& s, float* acc) {
  constexpr int GB = std::min(8, 24 / C - 1);
  const int64_t n = t1 - t0;
  for (int64_t g0 = 0; g0 < s.G; g0 += GB) {
    const int64_t gb = std::min<int64_t>(GB, s.G - g0);
    __m512 a[GB][C];
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < C; ++c) a[g][c] = _mm512_setzero_ps();
    for_rows(kv + s.v_offset, blocks, t0, t1, h, s, [&](const c10::BFloat16* v, int64_t j) {
      __m512 vf[C];
      for (int c = 0; c < C; ++c)
        vf[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * c))), 16));
      for (int g = 0; g < GB; ++g) {
        if (g >= gb) break;
        const __m512 w = _mm512_set1_ps(p[(g0 + g) * n + j]);
        for (int c = 0; c < C; ++c) a[g][c] = _mm512_fmadd_ps(w, vf[c], a[g][c]);
      }
    });
    for (int64_t g = 0; g < gb; ++g)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + (g0 + g) * s.D + 16 * c, a[g][c]);
  }
}

#endif

// acc[g * D + d] = sum_j p[g * n + j] * v_(t0 + j)[d] over the chunk, for the G heads of h.
template <typename S>
void pv_chunk(const float* p, const S* kv, const int64_t* blocks, int64_t t0, int64_t t1, int64_t h,
              const Shape& s, float* __restrict acc, float* __restrict vf) {
  const int64_t n = t1 - t0, D = s.D;
  std::fill(acc, acc + s.G * D, 0.f);
  for_rows(kv + s.v_offset, blocks, t0, t1, h, s, [&](const S* v, int64_t j) {
    const float sc = row_scale(v, s);
    for (int64_t d = 0; d < D; ++d) vf[d] = to_float(v[d]) * sc;
    for (int64_t g = 0; g < s.G; ++g) {
      const float w = p[g * n + j];
      float* __restrict a = acc + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += w * vf[d];
    }
  });
}

#ifdef FLEETLM_AVX512BF16
// The bf16 chunk for D = 32 * C2: scores, softmax, V sum.
template <int C2>
void attend_bf16(const float* qf, const c10::BFloat16* kv, const int64_t* blocks, int64_t t0, int64_t t1,
                 int64_t h, const Shape& s, float* m, float* l, float* acc, float* sc) {
  scores_bf16<C2>(qf, kv, blocks, t0, t1, h, s, sc);
  softmax_parts(sc, s.G, t1 - t0, m, l);
  pv_bf16<2 * C2>(sc, kv, blocks, t0, t1, h, s, acc);
}
#endif

// Splits each sequence's context into chunks of `chunk` tokens (a multiple of the block size)
// so that there are enough (sequence, chunk) work items for the threads.
int64_t chunk_tokens(int64_t B, const Shape& s, int64_t max_len) {
  const int64_t want = 2 * at::get_num_threads();
  const int64_t per_seq = std::max<int64_t>(1, (want + B - 1) / B);
  int64_t chunk = std::clamp<int64_t>((max_len + per_seq - 1) / per_seq, 64, 1024);
  return (chunk + s.BS - 1) / s.BS * s.BS;
}

// Attention of the G query heads of KV head h over tokens [t0, t1) of one sequence, unnormalized:
// m[g] the max score, l[g] the sum of exp(score - m), acc[g] the exp-weighted sum of V rows.
template <typename T, typename S>
void attend_chunk(const float* qf, const S* kv, const int64_t* blocks, int64_t t0, int64_t t1, int64_t h,
                  const Shape& s, float* m, float* l, float* acc, std::vector<float>& sc, std::vector<float>& vf) {
  sc.resize(s.G * (t1 - t0));
#ifdef FLEETLM_AVX512BF16
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, c10::BFloat16>) {
    switch (s.D) {  // head sizes 32, 64, 96 and 128 (others: the portable loops)
      case 32: return attend_bf16<1>(qf, kv, blocks, t0, t1, h, s, m, l, acc, sc.data());
      case 64: return attend_bf16<2>(qf, kv, blocks, t0, t1, h, s, m, l, acc, sc.data());
      case 96: return attend_bf16<3>(qf, kv, blocks, t0, t1, h, s, m, l, acc, sc.data());
      case 128: return attend_bf16<4>(qf, kv, blocks, t0, t1, h, s, m, l, acc, sc.data());
      default: break;
    }
  }
#endif
  scores_portable(qf, kv, blocks, t0, t1, h, s, sc.data());
  softmax_parts(sc.data(), s.G, t1 - t0, m, l);
  pv_chunk(sc.data(), kv, blocks, t0, t1, h, s, acc, vf.data());
}

// T: the query/output dtype; S: the cache's (T itself, int8 with per-row scales, or fp8 e4m3)
template <typename T, typename S = T>
void decode_kernel(const T* q, const S* kv, const int64_t* bt, const int64_t* lens, T* out, int64_t B,
                   const Shape& s, float scale) {
  const int64_t max_len = *std::max_element(lens, lens + B);
  const int64_t chunk = chunk_tokens(B, s, max_len), nc = (max_len + chunk - 1) / chunk;
  const int64_t G = s.G, D = s.D;
  // per (sequence, KV head, chunk): m[G], l[G], acc[G * D]
  std::vector<float> part(B * s.Hkv * nc * G * (D + 2));
  at::parallel_for(0, B * nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), vf(D), sc;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / nc, c = it % nc;
      const int64_t t0 = c * chunk, t1 = std::min(lens[b], t0 + chunk);
      for (int64_t h = 0; h < s.Hkv; ++h) {  // a chunk's blocks are read whole, head after head
        float* m = part.data() + ((b * s.Hkv + h) * nc + c) * G * (D + 2);
        float *l = m + G, *acc = l + G;
        if (t0 >= t1) {  // a shorter sequence than the longest: nothing in this chunk
          std::fill(m, m + G, -std::numeric_limits<float>::infinity());
          std::fill(l, l + G * (D + 1), 0.f);
          continue;
        }
        const T* qrow = q + (b * s.H + h * G) * D;
        for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(qrow[i]) * scale;
        attend_chunk<T, S>(qf.data(), kv, bt + b * s.max_blocks, t0, t1, h, s, m, l, acc, sc, vf);
      }
    }
  });
  // out[b, h*G + g] = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M the max over chunks
  at::parallel_for(0, B * s.Hkv, std::max<int64_t>(1, 4096 / (nc * G * D)), [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t g = 0; g < G; ++g) {
        float M = -std::numeric_limits<float>::infinity(), L = 0.f;
        for (int64_t c = 0; c < nc; ++c) M = std::max(M, part[(bh * nc + c) * G * (D + 2) + g]);
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t c = 0; c < nc; ++c) {
          const float* m = part.data() + (bh * nc + c) * G * (D + 2);
          if (m[G + g] == 0.f) continue;
          const float w = std::exp(m[g] - M);
          L += w * m[G + g];
          const float* acc = m + 2 * G + g * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
        }
        T* orow = out + (bh * G + g) * D;  // bh = b * Hkv + h, and query head h*G + g
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(o[d] / L);
      }
    }
  });
}

}  // namespace

// q [B, H, D]; kv_cache [2, num_blocks, block_size, Hkv, D] (contiguous; int8 caches [.., D + 2]:
// codes, then the row's fp16 scale; fp8 e4m3 caches [.., D]); block_table [B, max_blocks]
// int64; seq_lens [B] int64 (each >= 1). Returns [B, H, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                           torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous(), "q and kv_cache must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong,
              "block_table and seq_lens must be int64");
  const auto kv_type = kv_cache.scalar_type();
  const bool int8_kv = kv_type == torch::kChar, fp8_kv = kv_type == at::kFloat8_e4m3fn;
  TORCH_CHECK(q.scalar_type() == kv_type || int8_kv || fp8_kv,
              "kv_cache must have q's dtype, int8 (with per-row fp16 scales) or float8_e4m3fn");
  auto bt = block_table.contiguous();
  auto lens = seq_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = kv_cache.size(2), Hkv = kv_cache.size(3), hs = kv_cache.size(4);
  TORCH_CHECK(H % Hkv == 0 && hs == D + (int8_kv ? 2 : 0), "head shapes of q and kv_cache disagree");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens.data_ptr<int64_t>()[b] >= 1, "paged_decode: every sequence needs a cached token");
  Shape s{H, Hkv, H / Hkv, D, BS, bt.size(1), Hkv * hs, BS * Hkv * hs, kv_cache.stride(0), hs, int8_kv};
  auto out = torch::empty_like(q);
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const float sc = static_cast<float>(scale);
    const auto* qp = q.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    if (int8_kv) {
      decode_kernel<scalar_t, int8_t>(qp, kv_cache.data_ptr<int8_t>(), bt.data_ptr<int64_t>(),
                                      lens.data_ptr<int64_t>(), op, B, s, sc);
    } else if (fp8_kv) {
      decode_kernel<scalar_t, c10::Float8_e4m3fn>(qp, kv_cache.data_ptr<c10::Float8_e4m3fn>(),
                                                  bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), op, B, s, sc);
    } else {
      decode_kernel<scalar_t>(qp, kv_cache.data_ptr<scalar_t>(), bt.data_ptr<int64_t>(),
                              lens.data_ptr<int64_t>(), op, B, s, sc);
    }
  });
  return out;
}
