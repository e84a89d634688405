// Dense bf16 matrix-vector products for decode: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a
// few input rows (M <= kGemvMaxRows) and a bf16 weight [N, K] laid out as nn.Linear keeps it.
//
// Why: at batch 1 every linear layer is a GEMV, bound by reading the weight once. torch's bf16
// F.linear reached ~10 GB/s on SmolLM2's shapes here (1 thread); this loop streams each weight row
// once for all M input rows, with four rows in flight so the loads overlap.
//
// Paths, picked when the module is compiled (-march=native on the machine that runs it):
// AVX512-BF16 (dpbf16: 32 products per instruction, float accumulation), AVX-512F (bf16 widened
// to float by a shift, FMA), and a portable loop. Every path accumulates in float32 and rounds
// once to bf16 (round to nearest even), as the bf16 GEMM does; only the order of the float
// additions differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kRowsInFlight = 4;
constexpr int64_t kPrefetchAhead = 8;  // weight rows

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// acc[r][m] += w[r] . x[m] over k in [0, K) for R weight rows (R <= kRowsInFlight).
template <int64_t R>
void dot_rows(const uint16_t* const* w, const uint16_t* x, int64_t M, int64_t K, float (*acc)[kGemvMaxRows]) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  __m512 a[R][kGemvMaxRows];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) a[r][m] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512i wv[R];
    for (int64_t r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w[r] + k);
    for (int64_t m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
      for (int64_t r = 0; r < R; ++r)
        a[r][m] = _mm512_dpbf16_ps(a[r][m], reinterpret_cast<__m512bh&>(wv[r]), reinterpret_cast<const __m512bh&>(xv));
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) acc[r][m] += _mm512_reduce_add_ps(a[r][m]);
#elif defined(__AVX512F__)
  __m512 a[R][kGemvMaxRows];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) a[r][m] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int64_t r = 0; r < R; ++r) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k));
      wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    for (int64_t m = 0; m < M; ++m) {
      const __m256i hx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
      const __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hx), 16));
      for (int64_t r = 0; r < R; ++r) a[r][m] = _mm512_fmadd_ps(wv[r], xv, a[r][m]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) acc[r][m] += _mm512_reduce_add_ps(a[r][m]);
#endif
  for (; k < K; ++k)  // the tail (and the whole row on machines without AVX-512)
    for (int64_t r = 0; r < R; ++r) {
      const float wf = bf16_bits_to_float(w[r][k]);
      for (int64_t m = 0; m < M; ++m) acc[r][m] += wf * bf16_bits_to_float(x[m * K + k]);
    }
}

}  // namespace

// x [M, K] bf16 contiguous, w [N, K] bf16 (rows contiguous), bias [N] bf16 or None -> y [M, N] bf16.
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16,
              "bf16_gemv: bf16 input and weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.stride(1) == 1, "bf16_gemv: 2-D, rows contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ws = w.stride(0);
  TORCH_CHECK(M >= 1 && M <= kGemvMaxRows, "bf16_gemv: 1 to ", kGemvMaxRows, " input rows, got ", M);
  TORCH_CHECK(w.size(1) == K, "bf16_gemv: weight has ", w.size(1), " columns, input ", K);
  const uint16_t* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kBFloat16 && bias->is_contiguous() && bias->numel() == N,
                "bf16_gemv: bias bf16 [N]");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
  }
  auto y = torch::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t grain = std::max<int64_t>(kRowsInFlight, (int64_t(1) << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n += kRowsInFlight) {
      const int64_t R = std::min(kRowsInFlight, end - n);
#if defined(__AVX512F__)
      if (n + kPrefetchAhead + kRowsInFlight <= end)  // the rows ahead, so their loads overlap this math
        for (int64_t r = 0; r < kRowsInFlight; ++r) {
          const char* row = reinterpret_cast<const char*>(wp + (n + kPrefetchAhead + r) * ws);
          for (int64_t off = 0; off < K * 2; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
        }
#endif
      const uint16_t* rows[kRowsInFlight];
      float acc[kRowsInFlight][kGemvMaxRows] = {};
      for (int64_t r = 0; r < R; ++r) rows[r] = wp + (n + r) * ws;
      switch (R) {
        case 4: dot_rows<4>(rows, xp, M, K, acc); break;
        case 3: dot_rows<3>(rows, xp, M, K, acc); break;
        case 2: dot_rows<2>(rows, xp, M, K, acc); break;
        default: dot_rows<1>(rows, xp, M, K, acc); break;
      }
      for (int64_t r = 0; r < R; ++r) {
        const float b = bp ? bf16_bits_to_float(bp[n + r]) : 0.f;
        for (int64_t m = 0; m < M; ++m) yp[m * N + n + r] = at::BFloat16(acc[r][m] + b);
      }
    }
  });
  return y;
}

// The vector path this build of bf16_gemv has; Python uses the GEMV only with AVX-512.
std::string gemv_isa() {
#if defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512f";
#else
  return "portable";
#endif
}
