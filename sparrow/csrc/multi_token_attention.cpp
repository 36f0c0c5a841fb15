// Fused CPU multi-token attention (decode, verify, trees, prefill chunks): the semantics of
// sparrow.attention.multi_token_attention.
//
// q `[Hq, T, D]`; k/v_cache `[Hkv, >= past + T, D]` (last dim contiguous, any other strides);
// tail_mask `[T, T]` bool (True = new token i may attend new token j); -> `[Hq, T, D]`.
// Query head h = kv_head * G + g (transformers' repeat_kv pairing). Keys [0, past) are visible to
// every row, keys past + j to row t where tail_mask[t, j].
//
// Work: the G*T query rows of one KV head are stacked into one block of R rows, so each key/value
// is read from memory once for all of them. The key range is split into chunks (flash-decoding);
// tasks (KV head, chunk) run in parallel, each keeping fp32 online-softmax state (max, sum,
// unnormalised output) per row; a final log-sum-exp merge combines the chunks. Inside a chunk,
// keys go in blocks of BLOCK: scores S = Q K^T for the block (register tiles of rows x keys, the
// dot products summed across lanes by a transpose-reduce), the softmax update, then O += P V
// (register tiles of rows x head-dim vectors). Scores are kept in base 2 (scale * log2(e) is folded
// into Q) so the softmax uses exp2. While a block is computed, the next block's K and V rows are
// prefetched a line at a time from inside the compute loops: without that, a long cache costs the
// memory time plus the compute time instead of the larger of the two.
//
// Three implementations, chosen at run time: AVX-512 intrinsics (when the CPU has avx512f + avx512dq
// and D % 16 == 0), AVX2 + FMA intrinsics (the same structure in 8 lanes, D % 8 == 0), and portable
// loops the compiler vectorises (built for x86-64-v3 and the baseline on x86-64 Linux). The build
// needs no -march flag, so one build runs on any CPU. AVX-512 has a second layout for blocks of
// lanes_min_rows() rows or more (a verify: G * T rows), where the horizontal sums above cost as much as
// the FMAs: rows in the 16 lanes, scores as S^T = K Q^T with each key element broadcast, the softmax
// lane-wise down the keys (block_avx512_lanes); at G = 2 it runs a 6-token verify over a 25.6k cache
// ~37% faster than the row tiles and an 8-token one in about half their time. Prefill chunks (thousands
// of rows) take that path too; it skips the key blocks of the chunk's causal tail that no row of a
// 16-row group may see.

#include "attention.h"
#include "linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARROW_X86 1
#else
#define SPARROW_X86 0
#endif

namespace {

constexpr int64_t BLOCK = 64;           // keys per block: the score block [R, BLOCK] stays in L1
constexpr int64_t PREFETCH_AHEAD = 1;   // blocks: while one block is computed, the next streams in
constexpr int PREFETCH_PER_KEY_PV = 2;  // prefetched lines per key step of the P V loop (1 per QK step)
constexpr int64_t MIN_CHUNK = 512;      // fewest keys per parallel task
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float LOG2E = 1.4426950408889634f;

struct Problem {
  const float* q;  // [Hkv, R, D] rows scaled by scale * log2(e)
  const float* k;
  const float* v;
  int64_t k_sh, k_st, v_sh, v_st;  // head and token strides of the caches
  int64_t g, t, d, r, past, n;     // n = past + T keys
  const bool* mask;                // [T, T] contiguous
  const int64_t* group_last;       // [RP / LANES]: the last tail key (index j of past + j) any row of the group may see
};

constexpr int64_t LANES = 16;  // rows per group of the AVX-512 rows-in-lanes path

constexpr int64_t padded_rows(int64_t r) { return (r + LANES - 1) / LANES * LANES; }

// From this many rows per KV head on, AVX-512 takes the rows-in-lanes path: 4 measured as the
// crossover on a 25.6k cache (G = 2); settable so that tests and benchmarks can run either path.
std::atomic<int64_t>& lanes_min_rows() {
  static std::atomic<int64_t> value{4};
  return value;
}

// Per-task state: unnormalised output [R, D], running max and sum [RP] (R rounded up to LANES), score
// block [max(R, LANES), BLOCK].
struct TaskBuffers {
  float* o;
  float* m;
  float* l;
  float* s;
  float* alpha;  // [RP]: each row's rescale factor for the current block
  float* kt;     // [D, BLOCK]: the portable path's transposed key block
  float* qt;     // [RP / LANES, D, LANES]: the rows-in-lanes path's transposed queries, zero past R
};

// Scores of the tail keys a row may not see become -inf. Rows are r = g * T + t; row r's score for
// key k0 + j sits at s[(r - r0) * s_row + j * s_key] (the row tiles: [R, BLOCK]; the lanes: [BLOCK, LANES]).
void apply_tail_mask(const Problem& p, float* s, int64_t k0, int64_t nb, int64_t r0, int64_t r1,
                     int64_t s_row, int64_t s_key) {
  if (k0 + nb <= p.past) return;
  for (int64_t row = r0; row < r1; ++row) {
    const bool* allowed = p.mask + (row % p.t) * p.t;
    for (int64_t j = std::max<int64_t>(0, p.past - k0); j < nb; ++j) {
      if (!allowed[k0 + j - p.past]) s[(row - r0) * s_row + j * s_key] = NEG_INF;
    }
  }
}

void apply_tail_mask(const Problem& p, float* s, int64_t k0, int64_t nb) {
  apply_tail_mask(p, s, k0, nb, 0, p.r, BLOCK, 1);
}

// New running max of one row after a block whose largest score is `block_max`; writes the
// factor the old state is rescaled by. Returns false when the row has seen only masked keys.
inline bool advance_max(float& m, float block_max, float& alpha) {
  const float m_new = std::max(m, block_max);
  if (m_new == NEG_INF) {
    alpha = 1.0f;
    return false;
  }
  alpha = m == NEG_INF ? 0.0f : std::exp2(m - m_new);
  m = m_new;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Portable implementation.

// 2^x for x <= 0 (0 below -126, so -inf gives 0): 2^round(x) * 2^f with a degree-6 polynomial in
// f in [-0.5, 0.5] (Taylor coefficients ln2^i / i!), plain arithmetic the compiler vectorises.
constexpr float EXP2_POLY[7] = {1.0f, 6.9314718055994531e-1f, 2.4022650695910071e-1f, 5.5504108664821580e-2f,
                                9.6181291076284772e-3f, 1.3333558146428443e-3f, 1.5403530393381606e-4f};

[[gnu::always_inline]] inline float exp2_portable(float x) {
  const float xc = std::max(x, -126.0f);
  const float n = (xc + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float f = xc - n;
  float y = EXP2_POLY[6];
  for (int i = 5; i >= 0; --i) y = y * f + EXP2_POLY[i];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -126.0f ? 0.0f : y * scale;
}

// Scores over a transposed copy of the key block (kt `[D, BLOCK]`), so the inner loop runs along
// contiguous keys.
[[gnu::always_inline]] inline void scores_portable(const Problem& p, const float* q, const float* k, int64_t nb,
                                                   float* s, float* kt) {
  for (int64_t j = 0; j < nb; ++j) {
    for (int64_t c = 0; c < p.d; ++c) kt[c * BLOCK + j] = k[j * p.k_st + c];
  }
  for (int64_t row = 0; row < p.r; ++row) {
    float* sr = s + row * BLOCK;
    const float* qr = q + row * p.d;
    std::fill(sr, sr + BLOCK, 0.0f);
    for (int64_t c = 0; c < p.d; ++c) {
      const float qc = qr[c];
      const float* ktc = kt + c * BLOCK;
#pragma omp simd
      for (int64_t j = 0; j < BLOCK; ++j) sr[j] += qc * ktc[j];
    }
  }
}

[[gnu::always_inline]] inline void softmax_pv_portable(const Problem& p, const TaskBuffers& b, const float* v,
                                                       int64_t nb) {
  for (int64_t row = 0; row < p.r; ++row) {
    float* s = b.s + row * BLOCK;
    float* o = b.o + row * p.d;
    float block_max = NEG_INF;
    for (int64_t j = 0; j < nb; ++j) block_max = std::max(block_max, s[j]);
    float alpha;
    if (!advance_max(b.m[row], block_max, alpha)) continue;
    const float m = b.m[row];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < nb; ++j) {
      s[j] = exp2_portable(s[j] - m);
      sum += s[j];
    }
    b.l[row] = b.l[row] * alpha + sum;
#pragma omp simd
    for (int64_t c = 0; c < p.d; ++c) o[c] *= alpha;
    for (int64_t j = 0; j < nb; ++j) {
      const float w = s[j];
      const float* vj = v + j * p.v_st;
#pragma omp simd
      for (int64_t c = 0; c < p.d; ++c) o[c] += w * vj[c];
    }
  }
}

// Built twice on x86-64 Linux (AVX2 + FMA, and the baseline), picked by the loader from the CPU.
#if SPARROW_X86 && defined(__linux__) && defined(__GNUC__)
#define SPARROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARROW_CLONES
#endif

SPARROW_CLONES void block_portable(const Problem& p, const TaskBuffers& b, const float* q, const float* k,
                                   const float* v, int64_t k0, int64_t nb) {
  scores_portable(p, q, k + k0 * p.k_st, nb, b.s, b.kt);
  apply_tail_mask(p, b.s, k0, nb);
  softmax_pv_portable(p, b, v + k0 * p.v_st, nb);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 implementation.

#if SPARROW_X86

// Software prefetch of a later block's K and V rows, one line per call from inside the compute
// loops, so memory streams while the FMAs run (one burst per block stalls the core instead).
struct Prefetcher {
  const char* k;
  const char* v;
  int64_t k_st, v_st, row_bytes, rows;  // strides and row size in bytes
  int64_t row = 0, off = 0;
  bool on_v = false;

  Prefetcher(const Problem& p, const float* k_head, const float* v_head, int64_t first)
      : k(reinterpret_cast<const char*>(k_head + first * p.k_st)),
        v(reinterpret_cast<const char*>(v_head + first * p.v_st)),
        k_st(p.k_st * 4), v_st(p.v_st * 4), row_bytes(p.d * 4),
        rows(std::max<int64_t>(0, std::min(BLOCK, p.n - first))) {}

  inline void step() {
    if (row >= rows) return;
    _mm_prefetch((on_v ? v + row * v_st : k + row * k_st) + off, _MM_HINT_T1);  // into L2
    off += 64;
    if (off >= row_bytes) {
      off = 0;
      row += on_v;
      on_v = !on_v;
    }
  }
  void finish() {
    while (row < rows) step();
  }
};

// For loops whose caller prefetches by other means.
struct NoPrefetch {
  inline void step() {}
};

// Scores of NR rows x (16 / NR) keys: 16 dot products over D, one transpose-reduce.
template <int NR>
SPARROW_AVX512 inline void scores_tile(const Problem& p, const float* q, const float* k, float* s, Prefetcher& pf) {
  constexpr int NK = 16 / NR;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < p.d; c += 16) {
    pf.step();
    __m512 kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = _mm512_loadu_ps(k + j * p.k_st + c);
    for (int r = 0; r < NR; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * p.d + c);
      for (int j = 0; j < NK; ++j) acc[r * NK + j] = _mm512_fmadd_ps(qv, kv[j], acc[r * NK + j]);
    }
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sparrow_cpu::transpose_reduce16(acc));
  for (int r = 0; r < NR; ++r) std::memcpy(s + r * BLOCK, sums + r * NK, NK * sizeof(float));
}

SPARROW_AVX512 inline float dot_avx512(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
  return _mm512_reduce_add_ps(acc);
}

// Scores of all rows for keys [j, j + 16): each key's row is loaded into L1 once for all row tiles.
SPARROW_AVX512 inline void scores_keys16(const Problem& p, const float* q, const float* k, float* s, Prefetcher& pf) {
  int64_t row = 0;
  for (; row + 4 <= p.r; row += 4) {
    for (int j = 0; j < 16; j += 4) scores_tile<4>(p, q + row * p.d, k + j * p.k_st, s + row * BLOCK + j, pf);
  }
  for (; row + 2 <= p.r; row += 2) {
    for (int j = 0; j < 16; j += 8) scores_tile<2>(p, q + row * p.d, k + j * p.k_st, s + row * BLOCK + j, pf);
  }
  for (; row < p.r; ++row) scores_tile<1>(p, q + row * p.d, k, s + row * BLOCK, pf);
}

SPARROW_AVX512 void scores_avx512(const Problem& p, const float* q, const float* k, int64_t nb, float* s,
                                  Prefetcher& pf) {
  int64_t j = 0;
  for (; j + 16 <= nb; j += 16) {
    scores_keys16(p, q, k + j * p.k_st, s + j, pf);
  }
  for (; j < nb; ++j) {
    for (int64_t row = 0; row < p.r; ++row) s[row * BLOCK + j] = dot_avx512(q + row * p.d, k + j * p.k_st, p.d);
  }
}

// exp2_portable with AVX-512: 2^x for x <= 0, 0 below -126.
SPARROW_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 y = _mm512_set1_ps(EXP2_POLY[6]);
  for (int i = 5; i >= 0; --i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(EXP2_POLY[i]));
  return _mm512_maskz_scalef_ps(live, y, n);
}

// Softmax update of every row for the block: scores become weights, max/sum advance, and the
// row's rescale factor lands in alpha[row] (1 for a row that has seen only masked keys).
SPARROW_AVX512 void softmax_avx512(const Problem& p, const TaskBuffers& b, int64_t nb) {
  float* alpha = b.alpha;
  for (int64_t row = 0; row < p.r; ++row) {
    float* s = b.s + row * BLOCK;
    __m512 mx = _mm512_set1_ps(NEG_INF);
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 live = nb - j >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(NEG_INF), live, s + j));
    }
    if (!advance_max(b.m[row], _mm512_reduce_max_ps(mx), alpha[row])) {
      std::fill(s, s + nb, 0.0f);
      continue;
    }
    const __m512 m = _mm512_set1_ps(b.m[row]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 live = nb - j >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
      const __m512 e = exp2_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), m));
      _mm512_mask_storeu_ps(s + j, live, e);
      sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    b.l[row] = b.l[row] * alpha[row] + _mm512_reduce_add_ps(sum);
  }
}

// O[rows, c0 : c0 + 16 NV] = O * alpha + P[rows, :nb] V[:nb, c0 : c0 + 16 NV], in registers; row r's
// weight for key j is w[r * w_row + j * w_key].
template <int NR, int NV, class PF>
SPARROW_AVX512 inline void pv_tile(const Problem& p, float* o, const float* alpha, const float* w, int64_t w_row,
                                   int64_t w_key, const float* v, int64_t nb, int64_t c0, PF& pf) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * p.d + c0 + 16 * i));
  }
  for (int64_t j = 0; j < nb; ++j) {
    for (int i = 0; i < PREFETCH_PER_KEY_PV; ++i) pf.step();
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(v + j * p.v_st + c0 + 16 * i);
    for (int r = 0; r < NR; ++r) {
      const __m512 wr = _mm512_set1_ps(w[r * w_row + j * w_key]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(wr, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + r * p.d + c0 + 16 * i, acc[r][i]);
  }
}

template <int NR, int NV, class PF>
SPARROW_AVX512 void pv_rows(const Problem& p, float* o, const float* alpha, const float* w, int64_t w_row,
                            int64_t w_key, const float* v, int64_t nb, PF& pf) {
  int64_t c = 0;
  for (; c + 16 * NV <= p.d; c += 16 * NV) pv_tile<NR, NV>(p, o, alpha, w, w_row, w_key, v, nb, c, pf);
  for (; c < p.d; c += 16) pv_tile<NR, 1>(p, o, alpha, w, w_row, w_key, v, nb, c, pf);
}

// P V for rows [r0, r1), whose weights start at w (row r's at w + (r - r0) * w_row).
template <class PF>
SPARROW_AVX512 void pv_avx512(const Problem& p, const TaskBuffers& b, int64_t r0, int64_t r1, const float* w,
                              int64_t w_row, int64_t w_key, const float* v, int64_t nb, PF& pf) {
  int64_t row = r0;
  for (; row + 4 <= r1; row += 4) {
    pv_rows<4, 4>(p, b.o + row * p.d, b.alpha + row, w + (row - r0) * w_row, w_row, w_key, v, nb, pf);
  }
  for (; row + 2 <= r1; row += 2) {
    pv_rows<2, 8>(p, b.o + row * p.d, b.alpha + row, w + (row - r0) * w_row, w_row, w_key, v, nb, pf);
  }
  for (; row < r1; ++row) {
    pv_rows<1, 8>(p, b.o + row * p.d, b.alpha + row, w + (row - r0) * w_row, w_row, w_key, v, nb, pf);
  }
}

SPARROW_AVX512 void block_avx512(const Problem& p, const TaskBuffers& b, const float* q, const float* k,
                                 const float* v, int64_t k0, int64_t nb) {
  Prefetcher pf(p, k, v, k0 + PREFETCH_AHEAD * BLOCK);
  k += k0 * p.k_st;
  v += k0 * p.v_st;
  scores_avx512(p, q, k, nb, b.s, pf);
  apply_tail_mask(p, b.s, k0, nb);
  softmax_avx512(p, b, nb);
  pv_avx512(p, b, 0, p.r, b.s, BLOCK, 1, v, nb, pf);
  pf.finish();
}

// Many rows: the rows go in the 16 lanes instead, in groups of LANES. Scores come out transposed,
// S^T [keys, LANES]: S^T[j] = sum over c of K[j, c] * Q^T[c], one key element broadcast times the
// group's query column, so there are no horizontal sums (the transpose-reduce above spends ~30
// shuffles per 16 scores, as much port time as the FMAs once R reaches ~8), and the softmax's max,
// exp2 and sum run down the keys lane-wise too.

// S^T of NK keys for one row group (qt [D, LANES]): NK accumulators, one query column load per NK FMAs,
// each FMA taking its key element as a broadcast memory operand. With kn/vn set (NK = 16), the same 16
// keys of the next block are prefetched meanwhile: 16 rows of D / 16 lines each for K and V, so one
// line of each per step of c. KST: the cache's token stride when known at compile time (0: p.k_st);
// then all 16 key rows are one pointer plus constant offsets, where 16 row pointers leave too few
// registers and get reloaded from the stack (~8% of a 6-token verify's attention).
template <int NK, int KST = 0>
[[gnu::always_inline]] SPARROW_AVX512 inline void scores_lanes(const Problem& p, const float* qt, const float* k,
                                                               float* st, const char* kn, const char* vn) {
  __m512 acc[NK];
  const int64_t kst = KST ? KST : p.k_st;
  for (int j = 0; j < NK; ++j) acc[j] = _mm512_setzero_ps();
  int64_t line = 0;  // byte offset of the line to prefetch within the current key row
  for (int64_t c = 0; c < p.d; ++c) {
    if (kn != nullptr) {
      _mm_prefetch(kn + line, _MM_HINT_T1);
      _mm_prefetch(vn + line, _MM_HINT_T1);
      line += 64;
      if (line == p.d * 4) {
        line = 0;
        kn += p.k_st * 4;
        vn += p.v_st * 4;
      }
    }
    const __m512 qv = _mm512_loadu_ps(qt + c * LANES);
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(k[j * kst + c]), qv, acc[j]);
  }
  for (int j = 0; j < NK; ++j) _mm512_storeu_ps(st + j * LANES, acc[j]);
}

// The online-softmax update of one row group: weights replace the scores, m and l advance, alpha out.
// A lane that has seen only masked keys gets m = -inf and weights and alpha 0 (exp2 of NaN is 0 here).
SPARROW_AVX512 inline void softmax_lanes(float* st, int64_t nb, float* m, float* l, float* alpha) {
  __m512 mx[4], sum[4];  // four chains each, so the max and add latencies overlap
  for (int i = 0; i < 4; ++i) {
    mx[i] = _mm512_set1_ps(NEG_INF);
    sum[i] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < nb; ++j) mx[j % 4] = _mm512_max_ps(mx[j % 4], _mm512_loadu_ps(st + j * LANES));
  const __m512 m_old = _mm512_loadu_ps(m);
  const __m512 m_new = _mm512_max_ps(_mm512_max_ps(m_old, _mm512_max_ps(mx[0], mx[1])), _mm512_max_ps(mx[2], mx[3]));
  const __m512 a = exp2_avx512(_mm512_sub_ps(m_old, m_new));
  for (int64_t j = 0; j < nb; ++j) {
    const __m512 e = exp2_avx512(_mm512_sub_ps(_mm512_loadu_ps(st + j * LANES), m_new));
    _mm512_storeu_ps(st + j * LANES, e);
    sum[j % 4] = _mm512_add_ps(sum[j % 4], e);
  }
  _mm512_storeu_ps(m, m_new);
  const __m512 total = _mm512_add_ps(_mm512_add_ps(sum[0], sum[1]), _mm512_add_ps(sum[2], sum[3]));
  _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), a, total));
  _mm512_storeu_ps(alpha, a);
}

SPARROW_AVX512 void block_avx512_lanes(const Problem& p, const TaskBuffers& b, const float* k, const float* v,
                                       int64_t k0, int64_t nb) {
  const int64_t next = k0 + PREFETCH_AHEAD * BLOCK;  // first key of the block to prefetch
  k += k0 * p.k_st;
  v += k0 * p.v_st;
  NoPrefetch none;
  bool prefetched = false;
  for (int64_t r0 = 0; r0 < p.r; r0 += LANES) {
    // A prefill chunk's causal tail: blocks past every row of the group are skipped, not masked (their
    // weights would all be 0 and the rescale 1, so the state is exactly what computing them gives).
    if (k0 > p.past + p.group_last[r0 / LANES]) continue;
    float* st = b.s;  // [nb, LANES]
    const float* qt = b.qt + r0 * p.d;
    const bool pf_group = !prefetched;  // the first group computed prefetches the next block, once
    prefetched = true;
    int64_t j = 0;
    for (; j + 16 <= nb; j += 16) {
      const bool pf = pf_group && next + j + 16 <= p.n;  // never past the cache
      const int64_t ahead = next - k0;
      const float* kj = k + j * p.k_st;
      const char* kn = pf ? reinterpret_cast<const char*>(k + (ahead + j) * p.k_st) : nullptr;
      const char* vn = pf ? reinterpret_cast<const char*>(v + (ahead + j) * p.v_st) : nullptr;
      if (p.k_st == 64) {  // contiguous caches of the common head dims
        scores_lanes<16, 64>(p, qt, kj, st + j * LANES, kn, vn);
      } else if (p.k_st == 128) {
        scores_lanes<16, 128>(p, qt, kj, st + j * LANES, kn, vn);
      } else {
        scores_lanes<16>(p, qt, kj, st + j * LANES, kn, vn);
      }
    }
    for (; j + 4 <= nb; j += 4) scores_lanes<4>(p, qt, k + j * p.k_st, st + j * LANES, nullptr, nullptr);
    for (; j < nb; ++j) scores_lanes<1>(p, qt, k + j * p.k_st, st + j * LANES, nullptr, nullptr);
    apply_tail_mask(p, st, k0, nb, r0, std::min(p.r, r0 + LANES), 1, LANES);
    softmax_lanes(st, nb, b.m + r0, b.l + r0, b.alpha + r0);
    pv_avx512(p, b, r0, std::min(p.r, r0 + LANES), st, 1, LANES, v, nb, none);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA implementation: the AVX-512 one's structure in 8-lane registers (16 of them, so
// tiles hold 8 accumulators). Used where the CPU lacks AVX-512 and D % 8 == 0.

SPARROW_AVX2 inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

SPARROW_AVX2 inline float hmax8(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Scores of NR rows x (8 / NR) keys: 8 dot products over D, one transpose-reduce.
template <int NR>
SPARROW_AVX2 inline void scores_tile8(const Problem& p, const float* q, const float* k, float* s, Prefetcher& pf) {
  constexpr int NK = 8 / NR;
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < p.d; c += 8) {
    pf.step();
    __m256 kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = _mm256_loadu_ps(k + j * p.k_st + c);
    for (int r = 0; r < NR; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * p.d + c);
      for (int j = 0; j < NK; ++j) acc[r * NK + j] = _mm256_fmadd_ps(qv, kv[j], acc[r * NK + j]);
    }
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, sparrow_cpu::transpose_reduce8(acc));
  for (int r = 0; r < NR; ++r) std::memcpy(s + r * BLOCK, sums + r * NK, NK * sizeof(float));
}

SPARROW_AVX2 inline float dot_avx2(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  return hsum8(acc);
}

SPARROW_AVX2 void scores_avx2(const Problem& p, const float* q, const float* k, int64_t nb, float* s,
                              Prefetcher& pf) {
  int64_t j = 0;
  for (; j + 8 <= nb; j += 8) {  // each key row is loaded into L1 once for all row tiles
    const float* kj = k + j * p.k_st;
    int64_t row = 0;
    for (; row + 4 <= p.r; row += 4) {
      for (int i = 0; i < 8; i += 2) scores_tile8<4>(p, q + row * p.d, kj + i * p.k_st, s + row * BLOCK + j + i, pf);
    }
    for (; row + 2 <= p.r; row += 2) {
      for (int i = 0; i < 8; i += 4) scores_tile8<2>(p, q + row * p.d, kj + i * p.k_st, s + row * BLOCK + j + i, pf);
    }
    for (; row < p.r; ++row) scores_tile8<1>(p, q + row * p.d, kj, s + row * BLOCK + j, pf);
  }
  for (; j < nb; ++j) {
    for (int64_t row = 0; row < p.r; ++row) s[row * BLOCK + j] = dot_avx2(q + row * p.d, k + j * p.k_st, p.d);
  }
}

// exp2_portable with AVX2: 2^x for x <= 0, 0 below -126 (and for -inf).
SPARROW_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);  // [-0.5, 0.5]
  __m256 y = _mm256_set1_ps(EXP2_POLY[6]);
  for (int i = 5; i >= 0; --i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(EXP2_POLY[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), live);
}

// As softmax_avx512. Scores past nb are set to -inf first, so whole vectors can be read.
SPARROW_AVX2 void softmax_avx2(const Problem& p, const TaskBuffers& b, int64_t nb) {
  float* alpha = b.alpha;
  const int64_t nv = (nb + 7) / 8 * 8;
  for (int64_t row = 0; row < p.r; ++row) {
    float* s = b.s + row * BLOCK;
    std::fill(s + nb, s + nv, NEG_INF);
    __m256 mx = _mm256_set1_ps(NEG_INF);
    for (int64_t j = 0; j < nv; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
    if (!advance_max(b.m[row], hmax8(mx), alpha[row])) {
      std::fill(s, s + nb, 0.0f);
      continue;
    }
    const __m256 m = _mm256_set1_ps(b.m[row]);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < nv; j += 8) {
      const __m256 e = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    b.l[row] = b.l[row] * alpha[row] + hsum8(sum);
  }
}

// O[rows, c0 : c0 + 8 NV] = O * alpha + P[rows, :nb] V[:nb, c0 : c0 + 8 NV], in registers.
template <int NR, int NV>
SPARROW_AVX2 inline void pv_tile8(const Problem& p, float* o, const float* alpha, const float* w, const float* v,
                                  int64_t nb, int64_t c0, Prefetcher& pf) {
  __m256 acc[NR][NV];
  for (int r = 0; r < NR; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r]);
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_mul_ps(a, _mm256_loadu_ps(o + r * p.d + c0 + 8 * i));
  }
  for (int64_t j = 0; j < nb; ++j) {
    for (int i = 0; i < PREFETCH_PER_KEY_PV; ++i) pf.step();
    __m256 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = _mm256_loadu_ps(v + j * p.v_st + c0 + 8 * i);
    for (int r = 0; r < NR; ++r) {
      const __m256 wr = _mm256_set1_ps(w[r * BLOCK + j]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_fmadd_ps(wr, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + r * p.d + c0 + 8 * i, acc[r][i]);
  }
}

template <int NR, int NV>
SPARROW_AVX2 void pv_rows8(const Problem& p, const TaskBuffers& b, int64_t row, const float* v, int64_t nb,
                           Prefetcher& pf) {
  float* o = b.o + row * p.d;
  const float* alpha = b.alpha + row;
  const float* w = b.s + row * BLOCK;
  int64_t c = 0;
  for (; c + 8 * NV <= p.d; c += 8 * NV) pv_tile8<NR, NV>(p, o, alpha, w, v, nb, c, pf);
  for (; c < p.d; c += 8) pv_tile8<NR, 1>(p, o, alpha, w, v, nb, c, pf);
}

SPARROW_AVX2 void block_avx2(const Problem& p, const TaskBuffers& b, const float* q, const float* k, const float* v,
                             int64_t k0, int64_t nb) {
  Prefetcher pf(p, k, v, k0 + PREFETCH_AHEAD * BLOCK);
  k += k0 * p.k_st;
  v += k0 * p.v_st;
  scores_avx2(p, q, k, nb, b.s, pf);
  apply_tail_mask(p, b.s, k0, nb);
  softmax_avx2(p, b, nb);
  int64_t row = 0;
  for (; row + 4 <= p.r; row += 4) pv_rows8<4, 2>(p, b, row, v, nb, pf);
  for (; row + 2 <= p.r; row += 2) pv_rows8<2, 4>(p, b, row, v, nb, pf);
  for (; row < p.r; ++row) pv_rows8<1, 4>(p, b, row, v, nb, pf);
  pf.finish();
}

#endif

// ---------------------------------------------------------------------------------------------
// Dispatch, tasks and merge.

using sparrow_cpu::cpu_has_avx2;
using sparrow_cpu::cpu_has_avx512;
using sparrow_cpu::Isa;
using sparrow_cpu::isa_override;
using sparrow_cpu::pick_isa;

// One task: KV head h, keys [k0, k1) -> unnormalised output, max and sum per row.
void run_task(const Problem& p, Isa isa, const TaskBuffers& b, int64_t h, int64_t k0, int64_t k1) {
  const int64_t rp = padded_rows(p.r);
  std::fill(b.o, b.o + p.r * p.d, 0.0f);
  std::fill(b.m, b.m + rp, NEG_INF);
  std::fill(b.l, b.l + rp, 0.0f);
  if (isa == Isa::Portable) std::fill(b.kt, b.kt + p.d * BLOCK, 0.0f);  // columns past a short block stay finite
  const float* q = p.q + h * p.r * p.d;
  const float* k = p.k + h * p.k_sh;
  const float* v = p.v + h * p.v_sh;
  const bool lanes = isa == Isa::Avx512 && p.r >= lanes_min_rows().load();
  if (lanes) {  // qt[group][c][lane] = q[group * LANES + lane][c]
    std::fill(b.qt, b.qt + rp * p.d, 0.0f);
    for (int64_t row = 0; row < p.r; ++row) {
      float* dst = b.qt + (row / LANES) * p.d * LANES + row % LANES;
      for (int64_t c = 0; c < p.d; ++c) dst[c * LANES] = q[row * p.d + c];
    }
  }
  for (int64_t k0b = k0; k0b < k1; k0b += BLOCK) {
    const int64_t nb = std::min(BLOCK, k1 - k0b);
#if SPARROW_X86
    if (lanes) {
      block_avx512_lanes(p, b, k, v, k0b, nb);
      continue;
    }
    if (isa == Isa::Avx512) {
      block_avx512(p, b, q, k, v, k0b, nb);
      continue;
    }
    if (isa == Isa::Avx2) {
      block_avx2(p, b, q, k, v, k0b, nb);
      continue;
    }
#endif
    block_portable(p, b, q, k, v, k0b, nb);
  }
}

// "auto" (the best the CPU has), "portable", "avx2" or "avx512" (only where the CPU has it): returns the
// ISA the op uses for head dims that are a multiple of 16. The small-M linears follow the same setting.
std::string attention_isa(const std::string& which) {
  if (which == "portable") {
    isa_override().store(static_cast<int>(Isa::Portable));
  } else if (which == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "this CPU has no AVX2 + FMA");
    isa_override().store(static_cast<int>(Isa::Avx2));
  } else if (which == "auto" || which == "avx512") {
    TORCH_CHECK(which == "auto" || cpu_has_avx512(), "this CPU has no AVX-512 (avx512f + avx512dq)");
    isa_override().store(-1);
  } else if (which != "") {
    TORCH_CHECK(false, "isa must be auto, portable, avx2 or avx512, got ", which);
  }
  switch (pick_isa(16)) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

// rows > 0 sets the row count from which AVX-512 uses the rows-in-lanes layout (1: always, a huge
// value: never); returns the setting in force.
int64_t attention_lanes_min_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "lanes_min_rows must be positive (or 0 to read it), got ", rows);
  if (rows > 0) lanes_min_rows().store(rows);
  return lanes_min_rows().load();
}

}  // namespace

at::Tensor sparrow_cpu::multi_token_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, int64_t past, const at::Tensor& tail_mask,
                                              double scale) {
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "sparrow::multi_token_attention (C++): CPU tensors only");
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q must be [Hq, T, D] and the caches [Hkv, Tmax, D]");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "sparrow::multi_token_attention (C++): float32 only");
  const int64_t hq = q_in.size(0), t = q_in.size(1), d = q_in.size(2), hkv = k_cache.size(0);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, hq, " query heads are not a multiple of ", hkv, " KV heads");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(k_cache.size(2) == d, "cache head dim ", k_cache.size(2), " != query head dim ", d);
  TORCH_CHECK(past >= 0 && k_cache.size(1) >= past + t, "cache view holds ", k_cache.size(1),
              " positions, need past + T = ", past + t);
  TORCH_CHECK(tail_mask.dim() == 2 && tail_mask.size(0) == t && tail_mask.size(1) == t,
              "tail_mask must be [T, T]");
  const int64_t g = hq / hkv, r = g * t, n = past + t;
  at::Tensor out = at::empty({hq, t, d}, q_in.options());
  if (t == 0 || d == 0) return out;

  // The caches are read in place: only the last dimension must be contiguous.
  const at::Tensor k = k_cache.stride(2) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor v = v_cache.stride(2) == 1 ? v_cache : v_cache.contiguous();
  const at::Tensor mask = tail_mask.to(at::kBool).contiguous();
  // Rows r = g * T + t of KV head h are query head h * G + g, token t: q viewed as [Hkv, R, D].
  const at::Tensor qs = (q_in.reshape({hkv, r, d}) * static_cast<float>(scale * LOG2E)).contiguous();

  std::vector<int64_t> group_last(padded_rows(r) / LANES, -1);
  for (int64_t row = 0; row < r; ++row) {
    const bool* allowed = mask.data_ptr<bool>() + (row % t) * t;
    for (int64_t j = t - 1; j > group_last[row / LANES]; --j) {
      if (allowed[j]) {
        group_last[row / LANES] = j;
        break;
      }
    }
  }
  const Problem p{qs.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                  k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                  g, t, d, r, past, n, mask.data_ptr<bool>(), group_last.data()};
  const Isa isa = pick_isa(d);

  // Chunks of whole blocks, enough tasks for every thread twice over when the cache is long.
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  const int64_t want = std::max<int64_t>(1, (2 * threads + hkv - 1) / hkv);
  const int64_t chunks = std::max<int64_t>(1, std::min(want, n / MIN_CHUNK));
  const int64_t chunk_blocks = (blocks + chunks - 1) / chunks;
  const int64_t tasks = hkv * chunks;
  const int64_t rp = padded_rows(r);
  const int64_t s_size = std::max(r, LANES) * BLOCK;
  const int64_t per_task = r * d + 3 * rp + s_size + d * BLOCK + rp * d;
  at::Tensor scratch = at::empty({tasks, per_task}, q_in.options());
  float* base = scratch.data_ptr<float>();
  auto buffers = [&](int64_t task) {
    float* o = base + task * per_task;
    float* m = o + r * d;
    float* s = m + 3 * rp;
    float* kt = s + s_size;
    return TaskBuffers{o, m, m + rp, s, m + 2 * rp, kt, kt + d * BLOCK};
  };

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / chunks, c = task % chunks;
      const int64_t k0 = std::min(n, c * chunk_blocks * BLOCK), k1 = std::min(n, (c + 1) * chunk_blocks * BLOCK);
      run_task(p, isa, buffers(task), h, k0, k1);
    }
  });

  // Merge the chunks of each row: weights 2^(m_c - M), normalised by the merged sum.
  float* o = out.data_ptr<float>();
  at::parallel_for(0, hkv * r, 16, [&](int64_t begin, int64_t end) {
    for (int64_t hr = begin; hr < end; ++hr) {
      const int64_t h = hr / r, row = hr % r;
      float m_all = NEG_INF;
      for (int64_t c = 0; c < chunks; ++c) m_all = std::max(m_all, buffers(h * chunks + c).m[row]);
      float* dst = o + hr * d;  // out [Hq, T, D] is [Hkv, R, D] row-major
      std::fill(dst, dst + d, 0.0f);
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const TaskBuffers b = buffers(h * chunks + c);
        if (b.m[row] == NEG_INF) continue;
        const float w = std::exp2(b.m[row] - m_all);
        total += w * b.l[row];
        const float* src = b.o + row * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) dst[i] += w * src[i];
      }
      const float inv = 1.0f / total;  // a row that sees no key gets NaN, as softmax over -inf does
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) dst[i] *= inv;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(sparrow, m) {
  m.def("multi_token_attention(Tensor q, Tensor k_cache, Tensor v_cache, int past, Tensor tail_mask, float scale) -> Tensor");
  m.def("multi_token_attention_isa(str which) -> str", &attention_isa);
  m.def("multi_token_attention_lanes_min_rows(int rows) -> int", &attention_lanes_min_rows);
}

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("multi_token_attention", &sparrow_cpu::multi_token_attention);
}
