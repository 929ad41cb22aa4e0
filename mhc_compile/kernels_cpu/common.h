// Shared helpers of the fused CPU kernels (mhc_compile.kernels_cpu): included by coeffs.cpp and
// mix.cpp, the two translation units of the torch.ops.mhc_cpu extension built at first use. The math
// is that of mhc_compile/reference.py: coefficients and the whole Sinkhorn loop in the compute type
// (float for half/bfloat16/float inputs, double for double), mixing accumulated in it and rounded
// once to the stream dtype. Every kernel is one pass, parallel over tokens (at::parallel_for).
//
// Layout: streams x (T, n, C) contiguous; per-token coefficients (Tc, n) / (Tc, n, n) with Tc in
// {1, T} (Tc = 1: one broadcast set, e.g. static coefficients); gradients of coefficients are
// returned per token (T, ...) and reduced by the caller.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include "pool.h"
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>


namespace mhc_cpu {

constexpr double kSpread = 50.0;  // reference.SINKHORN_LOGIT_SPREAD

inline int64_t grain(int64_t work_per_token) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_token));
}

// sum_c a[c] b[c]: four independent 32-byte accumulators (GCC/Clang vector extensions), so it
// vectorises without -ffast-math; the summation order is fixed, so results are deterministic.
template <typename T>
inline T dot(const T* a, const T* b, int64_t C) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int64_t W = 32 / sizeof(T);
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t c = 0;
  for (; c + 4 * W <= C; c += 4 * W) {
    V a0, a1, a2, a3, b0, b1, b2, b3;
    std::memcpy(&a0, a + c, 32); std::memcpy(&b0, b + c, 32);
    std::memcpy(&a1, a + c + W, 32); std::memcpy(&b1, b + c + W, 32);
    std::memcpy(&a2, a + c + 2 * W, 32); std::memcpy(&b2, b + c + 2 * W, 32);
    std::memcpy(&a3, a + c + 3 * W, 32); std::memcpy(&b3, b + c + 3 * W, 32);
    s0 += a0 * b0; s1 += a1 * b1; s2 += a2 * b2; s3 += a3 * b3;
  }
  V s = (s0 + s1) + (s2 + s3);
  T out = 0;
  for (int64_t k = 0; k < W; ++k) out += s[k];
  for (; c < C; ++c) out += a[c] * b[c];
  return out;
}

// Software prefetch of `count` elements from p (every 64-byte line): the per-token kernels read a
// token's n stream rows as n interleaved sequential streams, which the hardware prefetcher follows
// poorly on data not in cache (pre_fwd on cold streams ran at 0.7x copy speed); the forward mixes
// ask for the rows a few tokens ahead: on cold streams (T = 512, n = 4, C = 256, 1 thread) pre_fwd,
// pre_bwd, post_res_fwd and post_res_norm_fwd took 21-35% less time. post_res_bwd (more work per
// byte) and the site start's projection ran 4-10% slower with it, so they do without. Prefetches
// never fault, so the end of a tensor needs no guard beyond staying inside it: prefetch_ahead(p, t,
// T, row) asks for row t + d of a (T, row) tensor when there is one, d = prefetch_distance() tokens
// (6; 0 turns it off: mhc_cpu::set_prefetch, for benchmarks).
inline int64_t& prefetch_distance() {
  static int64_t d = 6;
  return d;
}
template <typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* b = reinterpret_cast<const char*>(p);
  const int64_t bytes = count * int64_t(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(b + o, 0, 3);
}
template <typename T>
inline void prefetch_ahead(const T* p, int64_t t, int64_t T_, int64_t row) {
  const int64_t d = prefetch_distance();
  if (d > 0 && t + d < T_) prefetch(p + (t + d) * row, row);
}

// Calls f(std::integral_constant<int, N>) with N = n for n in 1..8 (loops over n unroll), else N = 0.
template <typename F>
inline void with_n(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// float tensors with n in 1..MaxN: runs per_token(std::integral_constant<int, n>{}, t) for every token t
// (parallel over tokens) and returns true; otherwise false and the caller's generic loop runs.
template <typename scalar_t, int MaxN = 8, typename F>
inline bool float_tokens(int64_t n, int64_t T, int64_t grain_size, F&& per_token) {
  bool done = false;
  if constexpr (std::is_same_v<scalar_t, float>) {
    with_n(n, [&](auto NC_) {
      constexpr int N = decltype(NC_)::value;
      if constexpr (N > 0 && N <= MaxN) {
        at::parallel_for(0, T, grain_size, [&](int64_t b, int64_t e) {
          for (int64_t t = b; t < e; ++t) per_token(NC_, t);
        });
        done = true;
      }
    });
  }
  return done;
}

#define MHC_DISPATCH(x, name, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

inline int64_t cstride(const at::Tensor& h, int64_t T, int64_t per) {
  TORCH_CHECK(h.size(0) == 1 || h.size(0) == T, "mhc_cpu: coefficients must have 1 or T rows");
  return h.size(0) == 1 ? 0 : per;
}

}  // namespace mhc_cpu
