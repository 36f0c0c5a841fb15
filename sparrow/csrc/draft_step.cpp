// One draft step, fused: the semantics of Draft.layer + Draft.logits (sparrow/draft.py) for one new
// token whose attention context is given, float32 CPU tensors.
//
// speculative.draft_tree runs the draft layer once per inner node of the draft tree, one token at a
// time. From Python each run is ~100 small tensor ops whose per-op overhead, not arithmetic, was the
// draft's whole cost on CPU (a 5-token chain took 12-16 ms on the demo draft, for ~4 MB of weights to
// read per token). Here it is one call of plain loops (weights read once, by matrix-vector products
// split across threads; norms, rotary, attention and the MLP gate in place), so a step costs about
// its weight reads.
//
// x_in [2H] = [token embedding; feature]; inv_freq [D/2] (rotary, rotate-half layout); position: the
// token's rotary position; ctx_k / ctx_v [Hkv, n + 1, D]: the rotated keys and values it attends
// (Sparrow: glimpses, text-anchor window, ancestors; EAGLE: the whole prefix, ancestors), then one free
// position that the step fills with its own key and value, so the attention is the runtime's
// multi-token op over the context in place (for EAGLE's prefix: flash-decoding across threads, each
// KV head read once for its G query heads);
// weights: inp [H, 2H], ln_attn [H], q [Hq*D, H], k [Hkv*D, H], v [Hkv*D, H], o [H, Hq*D],
// ln_mlp [H], gate [I, H], up [I, H], down [H, I], final_norm [H], head [V, H] (the matrices float32 or
// float16, the norms float32).
// Returns h [H] (the layer's output residual stream), k, v [Hkv, D] (its own rotated key, value) and
// logits [V]. Query head h pairs with KV head h / G (transformers' repeat_kv).
//
// draft_chain: a greedy chain of K such steps in one call (see there).
//
// draft_kv: the semantics of Draft.kv for the few rows a context takes in each round (x [T, H] at
// rotary positions [T] -> rotated keys, values [Hkv, T, D]); in Python it was ~20 small tensor ops, a
// sixth of a Sparrow round's bookkeeping.

#include "attention.h"
#include "linear.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SPARROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARROW_CLONES
#endif

namespace {

constexpr int64_t NUM_WEIGHTS = 12;

// y [N] = W [N, K] x [K]
void gemv(const at::Tensor& w, const float* x, float* y) { sparrow_cpu::small_m_product(w, x, 1, w.size(1), y); }

SPARROW_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// out = x / sqrt(mean(x^2) + eps) * w (in place allowed)
void rms_norm(const float* x, const float* w, double eps, float* out, int64_t n) {
  const float r = 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// cos/sin [D/2] of the rotary angles position * inv_freq.
void rotary_angles(float position, const float* inv, int64_t half, float* cos, float* sin) {
  for (int64_t i = 0; i < half; ++i) {
    const float ang = position * inv[i];
    cos[i] = std::cos(ang);
    sin[i] = std::sin(ang);
  }
}

// Rotate-half rotary embedding of `heads` vectors of D in place; cos/sin [D/2].
void rotate(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

// `matrix`: a weight read only by small_m_product, which takes float16 as well.
void check(const char* op, const at::Tensor& t, const char* name, std::vector<int64_t> shape,
           bool matrix = false) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || (matrix && t.scalar_type() == at::kHalf)),
              "sparrow::", op, ": ", name, " must be a float32", matrix ? " or float16" : "", " CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "sparrow::", op, ": ", name, " must be ", at::IntArrayRef(shape),
              ", got ", t.sizes());
}

// A draft's weights, checked against its shapes and made contiguous once per call.
struct StepWeights {
  int64_t h, d, hkv, hq, inter, vocab;
  double eps, final_eps;
  std::vector<at::Tensor> w;
};

StepWeights step_weights(const char* op, at::TensorList weights, const at::Tensor& inv_freq, const at::Tensor& ctx_k,
                         const at::Tensor& ctx_v, double eps, double final_eps) {
  TORCH_CHECK(weights.size() == NUM_WEIGHTS, "sparrow::", op, ": expected ", NUM_WEIGHTS, " weights, got ",
              weights.size());
  StepWeights s;
  s.eps = eps, s.final_eps = final_eps;
  s.h = weights[0].size(0), s.d = 2 * inv_freq.size(0), s.hkv = ctx_k.size(0), s.hq = weights[2].size(0) / s.d,
  s.inter = weights[7].size(0), s.vocab = weights[11].size(0);
  TORCH_CHECK(ctx_k.dim() == 3 && s.hkv > 0 && s.hq % s.hkv == 0, "sparrow::", op, ": ctx_k must be [Hkv, n + 1, D] "
              "with Hkv dividing the query heads, got ", ctx_k.sizes());
  TORCH_CHECK(ctx_k.size(1) >= 1, "sparrow::", op, ": ctx_k needs a free last position for the step's own key");
  check(op, inv_freq, "inv_freq", {s.d / 2});
  check(op, ctx_k, "ctx_k", {s.hkv, ctx_k.size(1), s.d});
  check(op, ctx_v, "ctx_v", {s.hkv, ctx_k.size(1), s.d});
  const char* names[NUM_WEIGHTS] = {"inp", "ln_attn", "q", "k", "v", "o", "ln_mlp", "gate", "up", "down",
                                    "final_norm", "head"};
  const int64_t h = s.h, d = s.d;
  const std::vector<std::vector<int64_t>> shapes = {{h, 2 * h}, {h}, {s.hq * d, h}, {s.hkv * d, h}, {s.hkv * d, h},
                                                    {h, s.hq * d}, {h}, {s.inter, h}, {s.inter, h}, {h, s.inter}, {h},
                                                    {s.vocab, h}};
  for (int64_t i = 0; i < NUM_WEIGHTS; ++i) {
    check(op, weights[i], names[i], shapes[i], shapes[i].size() == 2);
    s.w.push_back(weights[i].contiguous());
  }
  return s;
}

// One step over x_in [2H] at rotary `position`, attending ctx_k/v [Hkv, >= len + 1, D] (D contiguous) whose
// position `len` it fills with its own key and value first. Writes y [H], k, v [Hkv * D] and logits [V].
void run_step(const StepWeights& s, const float* xin, const float* inv_freq, int64_t position, const at::Tensor& ctx_k,
              const at::Tensor& ctx_v, int64_t len, float* y, float* k, float* v, float* logits) {
  const std::vector<at::Tensor>& w = s.w;
  const int64_t h = s.h, d = s.d;
  std::vector<float> x(h), n(h), tmp(h), a(s.inter), b(s.inter), cos(d / 2), sin(d / 2);
  at::Tensor q_t = at::empty({s.hq, 1, d}, ctx_k.options());  // [Hq, 1, D]
  float* q = q_t.data_ptr<float>();

  gemv(w[0], xin, x.data());  // [H]: the residual stream
  rms_norm(x.data(), w[1].data_ptr<float>(), s.eps, n.data(), h);
  gemv(w[2], n.data(), q);
  gemv(w[3], n.data(), k);
  gemv(w[4], n.data(), v);
  rotary_angles(static_cast<float>(position), inv_freq, d / 2, cos.data(), sin.data());
  rotate(q, s.hq, d, cos.data(), sin.data());
  rotate(k, s.hkv, d, cos.data(), sin.data());

  for (int64_t kv = 0; kv < s.hkv; ++kv) {  // the free position: the step's own key and value
    std::copy(k + kv * d, k + (kv + 1) * d, ctx_k.data_ptr<float>() + kv * ctx_k.stride(0) + len * ctx_k.stride(1));
    std::copy(v + kv * d, v + (kv + 1) * d, ctx_v.data_ptr<float>() + kv * ctx_v.stride(0) + len * ctx_v.stride(1));
  }
  const at::Tensor att = sparrow_cpu::multi_token_attention(
      q_t, ctx_k, ctx_v, len, at::ones({1, 1}, ctx_k.options().dtype(at::kBool)),
      1.0 / std::sqrt(static_cast<double>(d)));  // [Hq, 1, D]

  gemv(w[5], att.data_ptr<float>(), tmp.data());
  for (int64_t i = 0; i < h; ++i) x[i] += tmp[i];
  rms_norm(x.data(), w[6].data_ptr<float>(), s.eps, n.data(), h);
  gemv(w[7], n.data(), a.data());
  gemv(w[8], n.data(), b.data());
  for (int64_t i = 0; i < s.inter; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];  // silu(gate) * up
  gemv(w[9], a.data(), tmp.data());
  for (int64_t i = 0; i < h; ++i) y[i] = x[i] + tmp[i];
  rms_norm(y, w[10].data_ptr<float>(), s.final_eps, n.data(), h);
  gemv(w[11], n.data(), logits);
}

// The context is used in place (for EAGLE it is the whole prefix cache): only D must be contiguous.
at::Tensor d_contiguous(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> draft_step(
    const at::Tensor& x_in, const at::Tensor& inv_freq, int64_t position, const at::Tensor& ctx_k_in,
    const at::Tensor& ctx_v_in, at::TensorList weights, double eps, double final_eps) {
  const StepWeights s = step_weights("draft_step", weights, inv_freq, ctx_k_in, ctx_v_in, eps, final_eps);
  check("draft_step", x_in, "x_in", {2 * s.h});
  const at::Tensor ctx_k = d_contiguous(ctx_k_in), ctx_v = d_contiguous(ctx_v_in), xin = x_in.contiguous();
  auto opts = x_in.options();
  at::Tensor out_h = at::empty({s.h}, opts), out_k = at::empty({s.hkv * s.d}, opts),
             out_v = at::empty({s.hkv * s.d}, opts), logits = at::empty({s.vocab}, opts);
  run_step(s, xin.data_ptr<float>(), inv_freq.contiguous().data_ptr<float>(), position, ctx_k, ctx_v,
           ctx_k.size(1) - 1, out_h.data_ptr<float>(), out_k.data_ptr<float>(), out_v.data_ptr<float>(),
           logits.data_ptr<float>());
  return {out_h, out_k, out_v, logits};
}

// A greedy chain of `steps` draft tokens after `token` (whose feature is feat [H]) at rotary positions
// position, position + 1, ...: step i embeds the token step i - 1 chose (embed [V, H]), takes step i - 1's
// output as its feature, attends ctx_k/v [Hkv, n + steps, D] up to its own slot n + i (filled in place, so
// later steps see it) and picks its token by argmax, with the `eos` ids excluded for steps i < hold_eos
// (where the target holds end-of-turn back). Draft.step in a Python loop costs ~60 us a step on top of the
// fused step's arithmetic (context views, argmax, dispatch): a fifth of a 5-token round at 1k.
at::Tensor draft_chain(const at::Tensor& feat, int64_t token, int64_t steps, int64_t position,
                       const at::Tensor& ctx_k_in, const at::Tensor& ctx_v_in, const at::Tensor& embed,
                       const at::Tensor& inv_freq, at::TensorList weights, double eps, double final_eps,
                       int64_t hold_eos, at::IntArrayRef eos) {
  const StepWeights s = step_weights("draft_chain", weights, inv_freq, ctx_k_in, ctx_v_in, eps, final_eps);
  TORCH_CHECK(steps >= 1, "sparrow::draft_chain: steps must be at least 1, got ", steps);
  const int64_t n = ctx_k_in.size(1) - steps;
  TORCH_CHECK(n >= 0, "sparrow::draft_chain: ctx_k has ", ctx_k_in.size(1), " positions, fewer than the ", steps,
              " free ones the steps fill");
  check("draft_chain", feat, "feat", {s.h});
  check("draft_chain", embed, "embed", {s.vocab, s.h});
  TORCH_CHECK(token >= 0 && token < s.vocab, "sparrow::draft_chain: token ", token, " outside the vocabulary of ",
              s.vocab);
  for (int64_t e : eos) {
    TORCH_CHECK(e >= 0 && e < s.vocab, "sparrow::draft_chain: eos id ", e, " outside the vocabulary");
  }
  const at::Tensor ctx_k = d_contiguous(ctx_k_in), ctx_v = d_contiguous(ctx_v_in), emb = embed.contiguous(),
                   inv = inv_freq.contiguous(), f = feat.contiguous();
  at::Tensor out = at::empty({steps}, feat.options().dtype(at::kLong));
  std::vector<float> xin(2 * s.h), k(s.hkv * s.d), v(s.hkv * s.d), logits(s.vocab);
  std::copy(f.data_ptr<float>(), f.data_ptr<float>() + s.h, xin.data() + s.h);
  for (int64_t i = 0; i < steps; ++i) {
    const float* row = emb.data_ptr<float>() + token * s.h;
    std::copy(row, row + s.h, xin.data());
    // y lands where the next step's feature goes: the second half of its input
    run_step(s, xin.data(), inv.data_ptr<float>(), position + i, ctx_k, ctx_v, n + i, xin.data() + s.h, k.data(),
             v.data(), logits.data());
    if (i < hold_eos) {
      for (int64_t e : eos) logits[e] = -std::numeric_limits<float>::infinity();
    }
    token = std::max_element(logits.begin(), logits.end()) - logits.begin();  // the first of equal maxima
    out.data_ptr<int64_t>()[i] = token;
  }
  return out;
}

// x [T, H], positions [T], inv_freq [D/2], ln_attn [H], k / v [Hkv*D, H] -> keys, values [Hkv, T, D].
std::tuple<at::Tensor, at::Tensor> draft_kv(const at::Tensor& x_in, const at::Tensor& positions,
                                            const at::Tensor& inv_freq, const at::Tensor& ln_w, const at::Tensor& k_w,
                                            const at::Tensor& v_w, double eps) {
  TORCH_CHECK(x_in.dim() == 2, "sparrow::draft_kv: x must be [T, H], got ", x_in.sizes());
  const int64_t t = x_in.size(0), h = x_in.size(1), d = 2 * inv_freq.size(0);
  TORCH_CHECK(d > 0 && k_w.dim() == 2 && k_w.size(0) % d == 0, "sparrow::draft_kv: k must be [Hkv*D, H] with D = ", d,
              ", got ", k_w.sizes());
  const int64_t hkv = k_w.size(0) / d;
  check("draft_kv", x_in, "x", {t, h});
  check("draft_kv", positions, "positions", {t});
  check("draft_kv", inv_freq, "inv_freq", {d / 2});
  check("draft_kv", ln_w, "ln_attn", {h});
  check("draft_kv", k_w, "k", {hkv * d, h}, true);
  check("draft_kv", v_w, "v", {hkv * d, h}, true);
  const at::Tensor x = x_in.contiguous(), pos = positions.contiguous(), ln = ln_w.contiguous();
  at::Tensor n = at::empty({t, h}, x.options());                   // [T, H]
  at::Tensor k = at::empty({t, hkv, d}, x.options()), v = at::empty({t, hkv, d}, x.options());  // [T, Hkv, D]
  for (int64_t i = 0; i < t; ++i) {
    rms_norm(x.data_ptr<float>() + i * h, ln.data_ptr<float>(), eps, n.data_ptr<float>() + i * h, h);
  }
  sparrow_cpu::small_m_product(k_w.contiguous(), n.data_ptr<float>(), t, h, k.data_ptr<float>());
  sparrow_cpu::small_m_product(v_w.contiguous(), n.data_ptr<float>(), t, h, v.data_ptr<float>());
  std::vector<float> cos(d / 2), sin(d / 2);
  for (int64_t i = 0; i < t; ++i) {
    rotary_angles(pos.data_ptr<float>()[i], inv_freq.data_ptr<float>(), d / 2, cos.data(), sin.data());
    rotate(k.data_ptr<float>() + i * hkv * d, hkv, d, cos.data(), sin.data());
  }
  return {k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparrow, m) {
  m.def("draft_step(Tensor x_in, Tensor inv_freq, int position, Tensor(a!) ctx_k, Tensor(b!) ctx_v, Tensor[] weights, "
        "float eps, float final_eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("draft_chain(Tensor feat, int token, int steps, int position, Tensor(a!) ctx_k, Tensor(b!) ctx_v, "
        "Tensor embed, Tensor inv_freq, Tensor[] weights, float eps, float final_eps, int hold_eos, int[] eos) "
        "-> Tensor");
  m.def("draft_kv(Tensor x, Tensor positions, Tensor inv_freq, Tensor ln_attn, Tensor k, Tensor v, float eps) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("draft_step", &draft_step);
  m.impl("draft_chain", &draft_chain);
  m.impl("draft_kv", &draft_kv);
}
