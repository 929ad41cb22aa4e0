// Per-token gates of mhc::coeffs after the projection (RMS, logits, sigmoid gates, the Sinkhorn
// loop): shared by coeffs.cpp (coeffs_fwd, coeffs_bwd) and fused.cpp (the one-pass boundary forward).
#pragma once
#include "common.h"

namespace mhc_cpu {
namespace {

// One Sinkhorn step on m (n x n): A = m / colsum(m) (into A), row sums into r, M = A / rowsum(A)
// (into M); c receives the column sums. A and M may alias m.
template <typename acc, int N>
inline void sk_step(const acc* m, acc* c, acc* A, acc* r, acc* M, int64_t n_rt) {
  const int64_t n = N ? N : n_rt;
  for (int64_t j = 0; j < n; ++j) c[j] = m[j];
  for (int64_t i = 1; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) c[j] += m[i * n + j];
  for (int64_t i = 0; i < n; ++i) {
    acc sum{};
    for (int64_t j = 0; j < n; ++j) { A[i * n + j] = m[i * n + j] / c[j]; sum += A[i * n + j]; }
    r[i] = sum;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) M[i * n + j] = A[i * n + j] / r[i];
}

// W tokens side by side, one per lane of a 32-byte vector: the Sinkhorn loops of W tokens run as
// vector divisions (the same IEEE operations in the same order as the one-token path, so the
// results are identical to it).
template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int W = 32 / sizeof(T);
};

// exp(clamp(L - max(L), -SPREAD)) into m0; returns max(L)
template <typename acc, int N>
inline acc sk_start(const acc* L, acc* m0, int64_t n_rt) {
  const int64_t nn = (N ? N : n_rt) * (N ? N : n_rt);
  acc mx = L[0];
  for (int64_t k = 1; k < nn; ++k) mx = std::max(mx, L[k]);
  for (int64_t k = 0; k < nn; ++k) m0[k] = std::exp(std::max(L[k] - mx, acc(-kSpread)));
  return mx;
}

// Per token, from its RMS r: h_raw = proj / r, h = h_raw (tanh(h_raw) for hc), z = alpha_segment * h + b.
// Writes h_raw, h, z (K = 2n+n^2 each); returns r.
template <typename acc>
inline acc logits_of_rms(acc r, const acc* proj, const acc* alpha, const acc* bp, const acc* bo, const acc* br,
                         int64_t n, bool hc, acc* h_raw, acc* h, acc* z) {
  const int64_t K = 2 * n + n * n;
  for (int64_t k = 0; k < K; ++k) {
    h_raw[k] = proj[k] / r;
    h[k] = hc ? std::tanh(h_raw[k]) : h_raw[k];
    const int seg = k < n ? 0 : (k < 2 * n ? 1 : 2);
    const acc bias = seg == 0 ? bp[k] : (seg == 1 ? bo[k - n] : br[k - 2 * n]);
    z[k] = alpha[seg] * h[k] + bias;
  }
  return r;
}

// The token's RMS r = sqrt(mean(flat^2) + eps), then logits_of_rms; returns r.
template <typename acc>
inline acc logits(const acc* flat, int64_t nc, const acc* proj, const acc* alpha, const acc* bp, const acc* bo,
                  const acc* br, int64_t n, double eps, bool hc, acc* h_raw, acc* h, acc* z) {
  const acc r = std::sqrt(dot(flat, flat, nc) / acc(nc) + acc(eps));
  return logits_of_rms(r, proj, alpha, bp, bo, br, n, hc, h_raw, h, z);
}

// mhc::coeffs on one token's logits z: H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn (hc: z itself).
template <typename acc, int N>
inline void activate(const acc* z, int64_t n, int64_t iters, bool hc, acc* hp, acc* ho, acc* hr, acc* col, acc* row) {
  const int64_t nn = n * n;
  if (hc) {
    for (int64_t i = 0; i < n; ++i) { hp[i] = z[i]; ho[i] = z[n + i]; }
    for (int64_t k = 0; k < nn; ++k) hr[k] = z[2 * n + k];
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    hp[i] = sigm(z[i]);
    ho[i] = acc(2) * sigm(z[n + i]);
  }
  sk_start<acc, N>(z + 2 * n, hr, n);
  for (int64_t it = 0; it < iters; ++it) sk_step<acc, N>(hr, col, hr, row, hr, n);
}

// Scratch of gates_range, allocated once per thread chunk.
template <typename acc>
struct GateScratch {
  using V = typename Lanes<acc>::V;
  std::vector<acc> col, row, h_raw, h, z;
  std::vector<V> mv, colv, rowv;
  explicit GateScratch(int64_t n)
      : col(n), row(n), h_raw(2 * n + n * n), h(2 * n + n * n), z(2 * n + n * n), mv(n * n), colv(n), rowv(n) {}
};

// H_pre, H_post, H_res of `count` consecutive tokens from their vec(X) rows fp (count, NC) and
// projections pj (count, K), into pp (count, n), op (count, n), rp (count, n, n); W tokens at a time
// in vector lanes for the Sinkhorn loop (the same operations as the one-token path, so the same bits).
// rms (count), when not null, receives each token's RMS r (coeffs_bwd takes it back instead of
// reading the row again).
template <typename acc, int N>
inline void gates_range(const acc* fp, int64_t NC, const acc* pj, const acc* al, const acc* bpp, const acc* bop,
                        const acc* brp, int64_t n, double eps, int64_t iters, bool hc, acc* pp, acc* op, acc* rp,
                        int64_t count, GateScratch<acc>& s, acc* rms = nullptr) {
  using V = typename Lanes<acc>::V;
  constexpr int W = Lanes<acc>::W;
  const int64_t nn = n * n, K = 2 * n + nn;
  int64_t t = 0;
  if (!hc) {
    for (; t + W <= count; t += W) {  // W tokens at once: gates per token, Sinkhorn in lanes
      for (int l = 0; l < W; ++l) {
        const int64_t tl = t + l;
        const acc r = logits(fp + tl * NC, NC, pj + tl * K, al, bpp, bop, brp, n, eps, hc, s.h_raw.data(), s.h.data(),
                             s.z.data());
        if (rms) rms[tl] = r;
        for (int64_t i = 0; i < n; ++i) {
          pp[tl * n + i] = sigm(s.z[i]);
          op[tl * n + i] = acc(2) * sigm(s.z[n + i]);
        }
        acc* m = rp + tl * nn;
        sk_start<acc, N>(s.z.data() + 2 * n, m, n);
        for (int64_t k = 0; k < nn; ++k) s.mv[k][l] = m[k];
      }
      for (int64_t it = 0; it < iters; ++it)
        sk_step<V, N>(s.mv.data(), s.colv.data(), s.mv.data(), s.rowv.data(), s.mv.data(), n);
      for (int l = 0; l < W; ++l)
        for (int64_t k = 0; k < nn; ++k) rp[(t + l) * nn + k] = s.mv[k][l];
    }
  }
  for (; t < count; ++t) {
    const acc r = logits(fp + t * NC, NC, pj + t * K, al, bpp, bop, brp, n, eps, hc, s.h_raw.data(), s.h.data(),
                         s.z.data());
    if (rms) rms[t] = r;
    activate<acc, N>(s.z.data(), n, iters, hc, pp + t * n, op + t * n, rp + t * nn, s.col.data(), s.row.data());
  }
}

}  // namespace
}  // namespace mhc_cpu
