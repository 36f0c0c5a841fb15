// Small-M matrix products shared by the C++ ops (linear.cpp, draft_step.cpp).
#pragma once

#include <ATen/ATen.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARROW_AVX2 __attribute__((target("avx2,fma")))
#define SPARROW_F16C __attribute__((target("avx2,fma,f16c")))
#define SPARROW_AVX512 __attribute__((target("avx512f,avx512dq")))
#endif

#include <atomic>

namespace sparrow_cpu {

// The instruction set the ops run; isa_override() holds a forced one as an int (-1: the CPU's best),
// set through torch.ops.sparrow.multi_token_attention_isa (the tests run every path on one machine).
enum class Isa : int { Portable = 0, Avx512 = 1, Avx2 = 2 };
std::atomic<int>& isa_override();
bool cpu_has_avx512();  // avx512f + avx512dq, what the AVX-512 paths use
bool cpu_has_avx2();    // avx2 + fma
// The kernel for vectors of `width` floats (a head dim, a linear's K): AVX-512 needs width % 16 == 0,
// AVX2 width % 8 == 0, each where the CPU has it and the override allows it.
Isa pick_isa(int64_t width);

#ifdef SPARROW_AVX2
// Lane i of the result is the sum of the 8 lanes of a[i].
SPARROW_AVX2 inline __m256 transpose_reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // t0 = [a0..a3 sums over lanes 0-3 | a0..a3 over lanes 4-7], t1 the same for a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
#endif

#ifdef SPARROW_AVX512
// Lane i of the result is the sum of the 16 lanes of a[i]. Every a[i] goes through the same tree of adds
// whatever the other fifteen hold, so a dot product's bits do not depend on which tile slot it took.
SPARROW_AVX512 inline __m512 transpose_reduce16(const __m512* a) {
  __m512 u[8], w[4];
  for (int i = 0; i < 8; ++i) {
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(u[2 * i]), y = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // w[i], 128-bit quad c, element e: quad c's partial sum of a[4i + e]; now sum across quads.
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// y [M, N] = x [M, K] W^T for W [N, K] contiguous float32 or float16 (rows of x contiguous, x_stride
// apart), split across threads by output column; every weight row is read once for all M rows. A float16
// W is converted exactly and summed in float32 in the same order: the float32 copy of the same values
// gives the same bits, from half the bytes (what a draft step pays for after a long verify evicts it).
void small_m_product(const at::Tensor& w, const float* x, int64_t m, int64_t x_stride, float* y);

}  // namespace sparrow_cpu
