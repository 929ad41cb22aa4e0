// Per-token gates of mhc::coeffs after the projection (RMS, logits, sigmoid gates, the Sinkhorn
// loop): shared by coeffs.cpp (coeffs_fwd, coeffs_bwd) and fused.cpp (the one-pass boundary forward).
//
// The mhc variant runs W tokens at once, one per lane of a 64-byte vector (GateLanes), for every step after the
// RMS: logits, sigmoids, the Sinkhorn start and its 20 steps, and in the backward the replay and the
// gradients. A last group of fewer than W tokens fills its spare lanes with copies of its last token,
// so every token takes the same operations wherever it sits: the gates do not depend on T, on the
// thread split or on the kernel (coeffs_fwd, site_start_fwd and boundary_fwd give the same bits).
// exp is a vector polynomial in float (vexp) and each Sinkhorn normalisation multiplies by the
// reciprocal of its sum (one division per row or column instead of one per entry): the same math as
// reference.py, rounded differently (a few ulp), which the tests against the reference allow.
// The hc variant (no sigmoid, no Sinkhorn) stays one token at a time.
#pragma once
#include "common.h"

#include <limits>

namespace mhc_cpu {
namespace {

// W tokens side by side, one per lane of a 32-byte vector (GCC/Clang vector extensions): the GEMM tiles'
// width (gemm_tile.h, grad_mm.cpp).
template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int W = 32 / sizeof(T);
};

// The gates' lanes: 64 bytes (16 float tokens), one AVX-512 register or two AVX2 ones, so the
// Sinkhorn loop's chain of sums, reciprocals and products (latency-bound) has twice the tokens in flight.
template <typename T>
struct GateLanes {
  typedef T V __attribute__((vector_size(64)));
  static constexpr int W = 64 / sizeof(T);
};

// exp of every lane. float: Cephes' expf (x = k ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r,
// times 2^k as two powers of two built in the exponent bits, so that k = 128 still rounds to +inf and
// k = -126 stays normal; relative error about 1e-7), with exp(x) = +inf above log(FLT_MAX), 0 below
// log(FLT_MIN) (no subnormal results) and NaN kept. double: std::exp per lane.
template <typename acc>
inline typename GateLanes<acc>::V vexp(typename GateLanes<acc>::V x) {
  using V = typename GateLanes<acc>::V;
  if constexpr (std::is_same_v<acc, float>) {
    typedef int32_t VI __attribute__((vector_size(sizeof(V))));
    const V zero = V{}, hi = zero + 88.72283935546875f, lo = zero + -87.33654475055310898657f;
    V xc = x > hi ? hi : x;  // comparisons are false for NaN: NaN goes through
    xc = xc < lo ? lo : xc;
    const V fx = xc * 1.44269504088896341f + 0.5f;
    V k = __builtin_convertvector(__builtin_convertvector(fx, VI), V);  // truncation, then floor
    k = k > fx ? k - 1.0f : k;
    V r = xc - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    V p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    typedef uint32_t VU __attribute__((vector_size(sizeof(V))));
    const VI ki = __builtin_convertvector(k, VI), k1 = ki >> 1;  // floor(k / 2) and k - floor(k / 2)
    const VU b1 = (VU)(k1 + 127) << 23, b2 = (VU)(ki - k1 + 127) << 23;  // unsigned: no signed shift
    V s1, s2;
    std::memcpy(&s1, &b1, sizeof(V));
    std::memcpy(&s2, &b2, sizeof(V));
    p = (p * s1) * s2;
    p = x > hi ? zero + std::numeric_limits<float>::infinity() : p;
    return x < lo ? zero : p;
  } else {
    V out;
    for (int l = 0; l < GateLanes<acc>::W; ++l) out[l] = std::exp(x[l]);
    return out;
  }
}

template <typename acc>
inline typename GateLanes<acc>::V vsigm(typename GateLanes<acc>::V z) {
  return acc(1) / (acc(1) + vexp<acc>(-z));
}

// The Sinkhorn start of each lane's logits L (n x n): exp(max(L - max(L), -SPREAD)) into m0; returns max(L).
template <typename acc, int N>
inline typename GateLanes<acc>::V sk_start(const typename GateLanes<acc>::V* L, typename GateLanes<acc>::V* m0, int64_t n_rt) {
  using V = typename GateLanes<acc>::V;
  const int64_t nn = (N ? N : n_rt) * (N ? N : n_rt);
  const V floor_ = V{} - acc(kSpread);
  V mx = L[0];
  for (int64_t k = 1; k < nn; ++k) mx = mx < L[k] ? L[k] : mx;
  for (int64_t k = 0; k < nn; ++k) {
    const V d = L[k] - mx;
    m0[k] = vexp<acc>(d < floor_ ? floor_ : d);
  }
  return mx;
}

// One Sinkhorn step per lane on m (n x n): ic = 1 / colsum(m), A = m * ic, ir = 1 / rowsum(A),
// M = A * ir. ic and ir are kept for the backward; A and M may alias m.
template <typename V, int N>
inline void sk_step(const V* m, V* ic, V* A, V* ir, V* M, int64_t n_rt) {
  const int64_t n = N ? N : n_rt;
  for (int64_t j = 0; j < n; ++j) ic[j] = m[j];
  for (int64_t i = 1; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) ic[j] += m[i * n + j];
  for (int64_t j = 0; j < n; ++j) ic[j] = 1 / ic[j];
  for (int64_t i = 0; i < n; ++i) {
    V sum = A[i * n] = m[i * n] * ic[0];
    for (int64_t j = 1; j < n; ++j) sum += A[i * n + j] = m[i * n + j] * ic[j];
    ir[i] = 1 / sum;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) M[i * n + j] = A[i * n + j] * ir[i];
}

// Backward through the Sinkhorn steps, last to first, in place on g (n x n per lane), from every step's
// ic, ir, A and M (sk_step's outputs); s is n scratch.
template <typename V, int N>
inline void sk_backward(V* g, const V* ics, const V* irs, const V* As, const V* Ms, V* s, int64_t iters,
                        int64_t n_rt) {
  const int64_t n = N ? N : n_rt, nn = n * n;
  for (int64_t it = iters - 1; it >= 0; --it) {
    const V *ic = ics + it * n, *ir = irs + it * n, *A = As + it * nn, *M = Ms + it * nn;
    for (int64_t i = 0; i < n; ++i) {  // M = A * ir
      V sum = g[i * n] * M[i * n];
      for (int64_t j = 1; j < n; ++j) sum += g[i * n + j] * M[i * n + j];
      for (int64_t j = 0; j < n; ++j) g[i * n + j] = (g[i * n + j] - sum) * ir[i];
    }
    for (int64_t j = 0; j < n; ++j) s[j] = g[j] * A[j];  // A = M_prev * ic
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) s[j] += g[i * n + j] * A[i * n + j];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) g[i * n + j] = (g[i * n + j] - s[j]) * ic[j];
  }
}

// The RMS of one token's vec(X) row: sqrt(mean(flat^2) + eps).
template <typename acc>
inline acc rms_of(const acc* flat, int64_t nc, double eps) {
  return std::sqrt(dot(flat, flat, nc) / acc(nc) + acc(eps));
}

// Lane l's token of a group of cnt tokens (spare lanes repeat the last one).
inline int64_t lane_token(int l, int cnt) { return l < cnt ? l : cnt - 1; }

// Column k of a group's token-major rows src (row wide), one lane per token.
template <typename acc>
inline typename GateLanes<acc>::V lane_gather(const acc* src, int64_t row, int64_t k, int cnt) {
  typename GateLanes<acc>::V v;
  for (int l = 0; l < GateLanes<acc>::W; ++l) v[l] = src[lane_token(l, cnt) * row + k];
  return v;
}

// Each lane's RMS: known[l] where the forward kept it (known not null), else from the group's vec(X) rows fp.
template <typename acc>
inline typename GateLanes<acc>::V lane_rms(const acc* fp, int64_t NC, double eps, const acc* known, int cnt) {
  typename GateLanes<acc>::V rv;
  for (int l = 0; l < cnt; ++l) rv[l] = known ? known[l] : rms_of(fp + l * NC, NC, eps);
  for (int l = cnt; l < GateLanes<acc>::W; ++l) rv[l] = rv[cnt - 1];
  return rv;
}

// Logits of a group of tokens in lanes (mhc variant): h_raw = proj / r, z = alpha_segment h_raw + b,
// from each lane's RMS rv and the group's projection rows pj (K wide).
template <typename acc>
inline void lane_logits(const typename GateLanes<acc>::V& rv, const acc* pj, int cnt, const acc* al, const acc* bpp,
                        const acc* bop, const acc* brp, int64_t n, typename GateLanes<acc>::V* h_raw,
                        typename GateLanes<acc>::V* z) {
  using V = typename GateLanes<acc>::V;
  const int64_t K = 2 * n + n * n;
  for (int64_t k = 0; k < K; ++k) {
    const V p = lane_gather(pj, K, k, cnt);
    const int seg = k < n ? 0 : (k < 2 * n ? 1 : 2);
    const acc bias = seg == 0 ? bpp[k] : (seg == 1 ? bop[k - n] : brp[k - 2 * n]);
    h_raw[k] = p / rv;
    z[k] = al[seg] * h_raw[k] + bias;
  }
}

// Per token, from its RMS r (hc variant, one token): h_raw = proj / r, h = tanh(h_raw), z = alpha_segment h + b.
template <typename acc>
inline void logits_hc(acc r, const acc* proj, const acc* alpha, const acc* bp, const acc* bo, const acc* br, int64_t n,
                      acc* h_raw, acc* h, acc* z) {
  const int64_t K = 2 * n + n * n;
  for (int64_t k = 0; k < K; ++k) {
    h_raw[k] = proj[k] / r;
    h[k] = std::tanh(h_raw[k]);
    const int seg = k < n ? 0 : (k < 2 * n ? 1 : 2);
    const acc bias = seg == 0 ? bp[k] : (seg == 1 ? bo[k - n] : br[k - 2 * n]);
    z[k] = alpha[seg] * h[k] + bias;
  }
}

// Scratch of gates_range, allocated once per thread chunk.
template <typename acc>
struct GateScratch {
  using V = typename GateLanes<acc>::V;
  std::vector<acc> h_raw, h, z;      // hc, one token
  std::vector<V> hrv, zv, mv, ic, ir;  // mhc, a group in lanes
  explicit GateScratch(int64_t n)
      : h_raw(2 * n + n * n), h(2 * n + n * n), z(2 * n + n * n), hrv(2 * n + n * n), zv(2 * n + n * n), mv(n * n),
        ic(n), ir(n) {}
};

// H_pre, H_post, H_res of `count` consecutive tokens from their vec(X) rows fp (count, NC) and
// projections pj (count, K), into pp (count, n), op (count, n), rp (count, n, n). rms (count), when not
// null, receives each token's RMS r (coeffs_bwd takes it back instead of reading the row again).
template <typename acc, int N>
inline void gates_range(const acc* fp, int64_t NC, const acc* pj, const acc* al, const acc* bpp, const acc* bop,
                        const acc* brp, int64_t n, double eps, int64_t iters, bool hc, acc* pp, acc* op, acc* rp,
                        int64_t count, GateScratch<acc>& s, acc* rms = nullptr) {
  using V = typename GateLanes<acc>::V;
  constexpr int W = GateLanes<acc>::W;
  const int64_t nn = n * n, K = 2 * n + nn;
  if (hc) {
    for (int64_t t = 0; t < count; ++t) {
      const acc r = rms_of(fp + t * NC, NC, eps);
      if (rms) rms[t] = r;
      logits_hc(r, pj + t * K, al, bpp, bop, brp, n, s.h_raw.data(), s.h.data(), s.z.data());
      for (int64_t i = 0; i < n; ++i) { pp[t * n + i] = s.z[i]; op[t * n + i] = s.z[n + i]; }
      for (int64_t k = 0; k < nn; ++k) rp[t * nn + k] = s.z[2 * n + k];
    }
    return;
  }
  for (int64_t t = 0; t < count; t += W) {
    const int cnt = int(std::min<int64_t>(W, count - t));
    const V rv = lane_rms<acc>(fp + t * NC, NC, eps, nullptr, cnt);
    lane_logits<acc>(rv, pj + t * K, cnt, al, bpp, bop, brp, n, s.hrv.data(), s.zv.data());
    const V* z = s.zv.data();
    V* m = s.mv.data();
    sk_start<acc, N>(z + 2 * n, m, n);
    for (int64_t it = 0; it < iters; ++it) sk_step<V, N>(m, s.ic.data(), m, s.ir.data(), m, n);
    for (int64_t i = 0; i < n; ++i) {
      const V hp = vsigm<acc>(z[i]), ho = acc(2) * vsigm<acc>(z[n + i]);
      for (int l = 0; l < cnt; ++l) pp[(t + l) * n + i] = hp[l], op[(t + l) * n + i] = ho[l];
    }
    for (int l = 0; l < cnt; ++l) {
      for (int64_t k = 0; k < nn; ++k) rp[(t + l) * nn + k] = m[k][l];
      if (rms) rms[t + l] = rv[l];
    }
  }
}

}  // namespace
}  // namespace mhc_cpu
