// Small-M linear layers, float32 CPU: y [..., N] = x [..., K] W^T (+ b) for the few rows of a decode,
// verify or draft step (sparrow.runtime patches the target's text linears to call it up to SMALL_M rows).
//
// Each weight row is read once and dotted with every input row while it sits in L1, so a 6-row
// verify step costs about what a 1-row decode step does: the weights' reads. The BLAS path ran
// small-M products at a third of that speed here (a 256x768 layer: 121 us at M = 6, 42 us at M = 1).
// Every output element is the same loop whatever M is, so a row's result does not depend on how many
// rows share the call (a verify and a decode of the same token give the same bits).
//
// Three implementations, picked at run time like the attention op's (and by the same override):
// AVX-512 tiles of 16 dot products (K % 16 == 0), AVX2 tiles of 8 (K % 8 == 0), portable loops.

#include "linear.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#define SPARROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARROW_CLONES
#endif

namespace sparrow_cpu {

std::atomic<int>& isa_override() {
  static std::atomic<int> value{-1};
  return value;
}

bool cpu_has_avx512() {
#ifdef SPARROW_AVX512
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#ifdef SPARROW_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

Isa pick_isa(int64_t width) {
  const int forced = isa_override().load();
  if (forced == static_cast<int>(Isa::Portable)) return Isa::Portable;
  static const bool avx512 = cpu_has_avx512(), avx2 = cpu_has_avx2();
  if (avx512 && width % 16 == 0 && forced != static_cast<int>(Isa::Avx2)) return Isa::Avx512;
  return avx2 && width % 8 == 0 ? Isa::Avx2 : Isa::Portable;
}

namespace {

constexpr int64_t GRAIN = 128;  // output columns per task: a 256-wide layer stays on one thread

// W is float32, or float16 (read as float32: the conversion is exact, the arithmetic the same).
template <typename W>
SPARROW_CLONES void product_rows(const W* w, const float* x, int64_t m, int64_t x_stride, int64_t k, int64_t n,
                                 float* y, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const W* row = w + c * k;
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * x_stride;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < k; ++j) acc += static_cast<float>(row[j]) * xi[j];
      y[i * n + c] = acc;
    }
  }
}

#ifdef SPARROW_AVX2
// Columns [c0, c1) in tiles of 4 weight rows x 2 input rows: 8 accumulators over K, one
// transpose-reduce; the tile's weight rows stay in L1 for every pair of input rows. A tile's
// output is the same arithmetic whatever M is (an odd last row runs the tile with itself twice).
SPARROW_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SPARROW_F16C inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename W>
SPARROW_F16C void product_rows_avx2(const W* w, const float* x, int64_t m, int64_t x_stride, int64_t k,
                                    int64_t n, float* y, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    for (int64_t i = 0; i < m; i += 2) {
      const float* x0 = x + i * x_stride;
      const float* x1 = i + 1 < m ? x0 + x_stride : x0;
      __m256 acc[8];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t j = 0; j < k; j += 8) {
        const __m256 a0 = _mm256_loadu_ps(x0 + j), a1 = _mm256_loadu_ps(x1 + j);
        for (int r = 0; r < 4; ++r) {
          const __m256 wr = load8(w + (c + r) * k + j);
          acc[r] = _mm256_fmadd_ps(wr, a0, acc[r]);
          acc[4 + r] = _mm256_fmadd_ps(wr, a1, acc[4 + r]);
        }
      }
      alignas(32) float sums[8];
      _mm256_store_ps(sums, transpose_reduce8(acc));
      for (int r = 0; r < 4; ++r) {
        y[i * n + c + r] = sums[r];
        if (i + 1 < m) y[(i + 1) * n + c + r] = sums[4 + r];
      }
    }
  }
  if (c < c1) product_rows(w, x, m, x_stride, k, n, y, c, c1);
}

bool has_f16c() {  // the AVX2 tiles read float16 weights with it
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
}

SPARROW_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SPARROW_AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 dot products: weight rows [c, c + 16 / NM) x input rows [i, i + NM), accumulated over K in
// 16-lane chunks (NM input loads and 16 / NM weight loads per 16 FMAs), one transpose-reduce.
template <int NM, typename W>
[[gnu::always_inline]] SPARROW_AVX512 inline void tile16(const W* w, const float* x, int64_t x_stride, int64_t k,
                                                         int64_t n, float* y, int64_t c, int64_t i) {
  constexpr int NW = 16 / NM;
  __m512 acc[16];  // acc[r * NM + s]: weight row c + r, input row i + s
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 16) {
    __m512 xv[NM];
    for (int s = 0; s < NM; ++s) xv[s] = _mm512_loadu_ps(x + (i + s) * x_stride + j);
    for (int r = 0; r < NW; ++r) {
      const __m512 wr = load16(w + (c + r) * k + j);
      for (int s = 0; s < NM; ++s) acc[r * NM + s] = _mm512_fmadd_ps(wr, xv[s], acc[r * NM + s]);
    }
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, transpose_reduce16(acc));
  for (int a = 0; a < 16; ++a) y[(i + a % NM) * n + c + a / NM] = sums[a];
}

// Columns [c0, c1) in blocks of 16 (the block's weight rows stay in L1 across the row groups), input
// rows in groups of 4, then 2, then 1; columns past the last block go to the portable loop.
template <typename W>
SPARROW_AVX512 void product_rows_avx512(const W* w, const float* x, int64_t m, int64_t x_stride, int64_t k,
                                        int64_t n, float* y, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
      for (int64_t t = 0; t < 16; t += 4) tile16<4>(w, x, x_stride, k, n, y, c + t, i);
    for (; i + 2 <= m; i += 2)
      for (int64_t t = 0; t < 16; t += 8) tile16<2>(w, x, x_stride, k, n, y, c + t, i);
    for (; i < m; ++i) tile16<1>(w, x, x_stride, k, n, y, c, i);
  }
  if (c < c1) product_rows(w, x, m, x_stride, k, n, y, c, c1);
}
#endif

at::Tensor small_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu() && x_in.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat,
              "sparrow::small_linear: float32 CPU tensors only, got ", x_in.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && x_in.dim() >= 1 && x_in.size(-1) == weight.size(1),
              "sparrow::small_linear: x [..., K] and weight [N, K] do not match: ", x_in.sizes(), " and ",
              weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();  // [M, K]
  const at::Tensor w = weight.contiguous();
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty({x.size(0), n}, x_in.options());
  small_m_product(w, x.data_ptr<float>(), x.size(0), k, y.data_ptr<float>());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                "sparrow::small_linear: bias must be float32 [", n, "], got ", bias->sizes());
    y.add_(*bias);
  }
  return y.view(shape);
}

}  // namespace

namespace {
template <typename W>
void product(const W* wp, const float* x, int64_t m, int64_t x_stride, int64_t k, int64_t n, float* y) {
#ifdef SPARROW_AVX2
  static const bool f16c = has_f16c();
  const Isa isa = pick_isa(k);
  if (isa == Isa::Avx512) {
    at::parallel_for(0, n, GRAIN,
                     [&](int64_t c0, int64_t c1) { product_rows_avx512(wp, x, m, x_stride, k, n, y, c0, c1); });
    return;
  }
  if (isa == Isa::Avx2 && f16c) {
    at::parallel_for(0, n, GRAIN,
                     [&](int64_t c0, int64_t c1) { product_rows_avx2(wp, x, m, x_stride, k, n, y, c0, c1); });
    return;
  }
#endif
  at::parallel_for(0, n, GRAIN, [&](int64_t c0, int64_t c1) { product_rows(wp, x, m, x_stride, k, n, y, c0, c1); });
}
}  // namespace

void small_m_product(const at::Tensor& w, const float* x, int64_t m, int64_t x_stride, float* y) {
  const int64_t n = w.size(0), k = w.size(1);
  if (w.scalar_type() == at::kHalf) {
    product(w.data_ptr<at::Half>(), x, m, x_stride, k, n, y);
  } else {
    product(w.data_ptr<float>(), x, m, x_stride, k, n, y);
  }
}

}  // namespace sparrow_cpu

TORCH_LIBRARY_FRAGMENT(sparrow, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("small_linear", &sparrow_cpu::small_linear);
}
