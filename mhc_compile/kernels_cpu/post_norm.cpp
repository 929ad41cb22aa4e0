// The end of a post-LN site in one pass (issue #25, eval forward): X' = H_res X + H_post h_out, then a
// LayerNorm over C on each of the n streams while the token is in cache. This is BERT's LN(x + f(x))
// on streams. X' gets post_res_fwd's bits (mix_tokens.h, and the same generic loop), rounded to x's
// dtype as post_res_fwd writes it; the norm of each rounded row is two-pass (mean, then the centred
// variance) in the compute type, and rounds once to x's dtype. It is forward only: the eager no-grad
// path of ops.post_res_norm (with autograd, post_res and the LayerNorm module run as before).
#include "mix_tokens.h"

namespace mhc_cpu {
namespace {

// sum_c v[c] (Squares false) or sum_c (v[c] - shift)^2 (true) over one row: four independent 32-byte
// accumulators (not one latency-bound chain), summed in a fixed order.
template <bool Squares, typename acc>
inline acc vsum(const acc* v, int64_t C, acc shift) {
  typedef acc V __attribute__((vector_size(32)));
  constexpr int64_t W = 32 / sizeof(acc);
  constexpr bool squares = Squares;
  V s[4] = {};
  int64_t c = 0;
  for (; c + 4 * W <= C; c += 4 * W)
    for (int k = 0; k < 4; ++k) {
      V a;
      std::memcpy(&a, v + c + k * W, 32);
      if (squares) { a -= shift; a *= a; }
      s[k] += a;
    }
  for (; c + W <= C; c += W) {
    V a;
    std::memcpy(&a, v + c, 32);
    if (squares) { a -= shift; a *= a; }
    s[0] += a;
  }
  const V t = (s[0] + s[1]) + (s[2] + s[3]);
  acc out = 0;
  for (int64_t k = 0; k < W; ++k) out += t[k];
  for (; c < C; ++c) out += squares ? (v[c] - shift) * (v[c] - shift) : v[c];
  return out;
}

// out[c] = (v[c] - mean) * rstd * w[c] + b[c] over one row of C values v (compute type; w, b may be
// null), mean and variance summed in a fixed order in 32-byte vectors: deterministic.
template <typename scalar_t, typename acc>
inline void norm_row(const acc* v, int64_t C, const scalar_t* w, const scalar_t* b, acc eps, scalar_t* out) {
  typedef acc V __attribute__((vector_size(32)));
  constexpr int64_t W = 32 / sizeof(acc);
  const acc mean = vsum<false>(v, C, acc(0)) / acc(C);
  const acc sq = vsum<true>(v, C, mean);
  const acc rstd = acc(1) / std::sqrt(sq / acc(C) + eps);
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, acc>) {  // float / double: W lanes at a time, the same operations
    for (; c + W <= C; c += W) {
      V a;
      std::memcpy(&a, v + c, 32);
      a = (a - mean) * rstd;
      if (w) { V wv; std::memcpy(&wv, w + c, 32); a = a * wv; }
      if (b) { V bv; std::memcpy(&bv, b + c, 32); a = a + bv; }
      std::memcpy(out + c, &a, 32);
    }
  }
  for (; c < C; ++c) {
    acc y = (v[c] - mean) * rstd;
    if (w) y = y * acc(w[c]);
    if (b) y = y + acc(b[c]);
    out[c] = scalar_t(y);
  }
}

// out (T, n, C) = per-stream LayerNorm(post_res(x, h_out, h_post, h_res)) with weight / bias (C) or none.
at::Tensor post_res_norm_fwd(const at::Tensor& x_, const at::Tensor& hout_, const at::Tensor& ho_, const at::Tensor& hr_,
                             const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
                             double eps) {
  at::Tensor x = x_.contiguous(), hout = hout_.contiguous(), ho = ho_.contiguous(), hr = hr_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  const int64_t so = cstride(ho, T, n), sr = cstride(hr, T, n * n);
  at::Tensor weight, bias;
  if (weight_.has_value() && weight_->defined()) weight = weight_->contiguous();
  if (bias_.has_value() && bias_->defined()) bias = bias_->contiguous();
  TORCH_CHECK(hout.scalar_type() == x.scalar_type(), "mhc_cpu::post_res_norm_fwd: h_out dtype must be x's");
  for (const at::Tensor* p : {&weight, &bias})
    TORCH_CHECK(!p->defined() || (p->numel() == C && p->scalar_type() == x.scalar_type()),
                "mhc_cpu::post_res_norm_fwd: weight and bias must have C elements in x's dtype");
  at::Tensor out = out_empty({T, n, C}, x.options());
  MHC_DISPATCH(x, "mhc_cpu_post_res_norm_fwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *hop = hout.data_ptr<scalar_t>();
    const scalar_t *wp = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
    const scalar_t *bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const acc *hpo = ho.data_ptr<acc>(), *hrp = hr.data_ptr<acc>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const acc e = acc(eps);
    if (float_tokens<scalar_t>(n, T, grain(n * n * C + 4 * n * C), [&](auto NC_, int64_t t) {
          constexpr int N = decltype(NC_)::value;
          // runs for float only (float_tokens); the casts are no-ops there and let the other types compile
          float* o = reinterpret_cast<float*>(outp + t * n * C);
          const float *w = reinterpret_cast<const float*>(wp), *bb = reinterpret_cast<const float*>(bp);
          prefetch_ahead(xp, t, T, n * C), prefetch_ahead(hop, t, T, C);
          post_res_token_f32<N>(xp + t * n * C, hop + t * C, hrp + t * sr, hpo + t * so, o, C);
          for (int i = 0; i < N; ++i) norm_row<float, float>(o + i * C, C, w, bb, float(eps), o + i * C);
        }))
      return;
    at::parallel_for(0, T, grain(n * n * C + 4 * n * C), [&](int64_t b, int64_t end) {
      std::vector<acc> xa(n * C), ha(C), buf(C);
      for (int64_t t = b; t < end; ++t) {
        scalar_t* o = outp + t * n * C;  // post_res_fwd's X' (rounded to x's dtype), then each row's norm
        post_res_token(xp + t * n * C, hop + t * C, hrp + t * sr, hpo + t * so, o, n, C, xa.data(), ha.data(),
                       buf.data());
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t c = 0; c < C; ++c) buf[c] = acc(o[i * C + c]);
          norm_row<scalar_t, acc>(buf.data(), C, wp, bp, e, o + i * C);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace mhc_cpu

TORCH_LIBRARY_FRAGMENT(mhc_cpu, m) {
  m.def("post_res_norm_fwd(Tensor x, Tensor h_out, Tensor h_post, Tensor h_res, Tensor? weight, Tensor? bias, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("post_res_norm_fwd", &mhc_cpu::post_res_norm_fwd);
}
