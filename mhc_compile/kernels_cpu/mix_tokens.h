// One token of the float pre / post_res forward with the n stream chunks in registers: shared by
// mix.cpp (pre_fwd, post_res_fwd) and fused.cpp (the one-pass boundary forward), so both give the
// same bits.
#pragma once
#include "common.h"

namespace mhc_cpu {
namespace {

// float, n = N known: out[i, c] = (sum_j R[i, j] x[j, c]) + P[i] h[c] for the W channels from c, with the
// n stream chunks held in registers (one read of x and h, one write of out per token).
template <int N, int W>
inline void post_res_lanes_f32(const float* xt, const float* ht, const float* R, const float* P, float* out, int64_t C,
                               int64_t c) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  V xs[N], h;
  for (int j = 0; j < N; ++j) std::memcpy(&xs[j], xt + j * C + c, sizeof(V));
  std::memcpy(&h, ht + c, sizeof(V));
  for (int i = 0; i < N; ++i) {
    V b = R[i * N] * xs[0];
    for (int j = 1; j < N; ++j) b += R[i * N + j] * xs[j];
    b += P[i] * h;
    std::memcpy(out + i * C + c, &b, sizeof(V));
  }
}

// float, n = N known: post_res of one token over C, sixteen lanes at a time (one 64-byte vector on
// AVX-512: half the vector operations of 8 lanes where the FMA units are 512 bits wide), then eight,
// then one; the same operations in the same order per value as the generic loop of post_res_fwd.
template <int N>
inline void post_res_token_f32(const float* xt, const float* ht, const float* R, const float* P, float* out, int64_t C) {
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) post_res_lanes_f32<N, 16>(xt, ht, R, P, out, C, c);
  for (; c + 8 <= C; c += 8) post_res_lanes_f32<N, 8>(xt, ht, R, P, out, C, c);
  for (; c < C; ++c)
    for (int i = 0; i < N; ++i) {
      float b = R[i * N] * xt[c];
      for (int j = 1; j < N; ++j) b += R[i * N + j] * xt[j * C + c];
      out[i * C + c] = b + P[i] * ht[c];
    }
}

// Any type, n at run time: post_res of one token, out[i, c] = r((sum_j R[i, j] x[j, c]) + P[i] h[c]) with
// r() the rounding to x's dtype, accumulated in the compute type (xa: n * C, ha and buf: C values of
// scratch): the generic loop of post_res_fwd (mix.cpp), the boundary forward (fused.cpp) and
// post_res_norm_fwd (post_norm.cpp).
template <typename scalar_t, typename acc>
inline void post_res_token(const scalar_t* xt, const scalar_t* ht, const acc* R, const acc* P, scalar_t* out,
                           int64_t n, int64_t C, acc* xa, acc* ha, acc* buf) {
  for (int64_t k = 0; k < n * C; ++k) xa[k] = acc(xt[k]);
  for (int64_t c = 0; c < C; ++c) ha[c] = acc(ht[c]);
  for (int64_t i = 0; i < n; ++i) {
    const acc r0 = R[i * n];
    for (int64_t c = 0; c < C; ++c) buf[c] = r0 * xa[c];
    for (int64_t j = 1; j < n; ++j) {
      const acc rij = R[i * n + j];
      const acc* xj = xa + j * C;
      for (int64_t c = 0; c < C; ++c) buf[c] += rij * xj[c];
    }
    const acc pi = P[i];
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = scalar_t(buf[c] + pi * ha[c]);
  }
}

// float, n = N known: h_in[c] = sum_i hp[i] x[i, c] for the W channels from c.
template <int N, int W>
inline void pre_lanes_f32(const float* xt, const float* h, float* out, int64_t C, int64_t c) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  V b, xi;
  std::memcpy(&xi, xt + c, sizeof(V));
  b = h[0] * xi;
  for (int i = 1; i < N; ++i) { std::memcpy(&xi, xt + i * C + c, sizeof(V)); b += h[i] * xi; }
  std::memcpy(out + c, &b, sizeof(V));
}

// float, n = N known: pre of one token, sixteen lanes at a time, then eight, then one (as post_res above).
template <int N>
inline void pre_token_f32(const float* xt, const float* h, float* out, int64_t C) {
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) pre_lanes_f32<N, 16>(xt, h, out, C, c);
  for (; c + 8 <= C; c += 8) pre_lanes_f32<N, 8>(xt, h, out, C, c);
  for (; c < C; ++c) {
    float b = h[0] * xt[c];
    for (int i = 1; i < N; ++i) b += h[i] * xt[i * C + c];
    out[c] = b;
  }
}

}  // namespace
}  // namespace mhc_cpu
