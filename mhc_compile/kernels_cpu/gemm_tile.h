// The register tile of the CPU kernels' skinny GEMMs: shared by fused.cpp (the phi projection) and
// grad_mm.cpp (the backward's X gradient).
#pragma once
#include "gates.h"

namespace mhc_cpu {
namespace {

// out[t, v*W:(v+1)*W] = sum_p x[t, p] ph[p, v*W:(v+1)*W] for TB tokens and KV vectors of outputs,
// accumulated in p order (one FMA chain per output: the order does not depend on the tiling).
template <typename acc, int TB, int KV>
inline void gemm_tile(const acc* x, int64_t NC, const acc* ph, int64_t ldp, acc* out, int64_t ldo) {
  using V = typename Lanes<acc>::V;
  constexpr int W = Lanes<acc>::W;
  V s[TB][KV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < KV; ++v) s[t][v] = V{};
  for (int64_t p = 0; p < NC; ++p) {
    V w[KV];
    for (int v = 0; v < KV; ++v) std::memcpy(&w[v], ph + p * ldp + v * W, sizeof(V));
    for (int t = 0; t < TB; ++t) {
      const acc xv = x[t * NC + p];
      for (int v = 0; v < KV; ++v) s[t][v] += xv * w[v];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < KV; ++v) std::memcpy(out + t * ldo + v * W, &s[t][v], sizeof(V));
}

// The float projection's tile on AVX-512 hosts, for Kp = 8, 16 or 24 outputs (n <= 4): one 16-lane and/or
// one 8-lane vector per token (Z, Y in {0, 1}), so 24 outputs take two FMAs per token and p where three
// 8-lane ones took three; a core that runs 512-bit FMAs at full width (Zen 5, Intel) does the tile in
// 2/3 of the cycles. The same FMA chain per output in p order as gemm_tile: the same bits.
template <int TB, int Z, int Y>
inline void gemm_tile_wide(const float* x, int64_t NC, const float* ph, int64_t ldp, float* out, int64_t ldo) {
  typedef float VZ __attribute__((vector_size(64)));
  typedef float VY __attribute__((vector_size(32)));
  VZ sz[TB];
  VY sy[TB];
  for (int t = 0; t < TB; ++t) {
    sz[t] = VZ{};
    sy[t] = VY{};
  }
  for (int64_t p = 0; p < NC; ++p) {
    VZ wz{};
    VY wy{};
    if (Z) std::memcpy(&wz, ph + p * ldp, sizeof(VZ));
    if (Y) std::memcpy(&wy, ph + p * ldp + 16 * Z, sizeof(VY));
    for (int t = 0; t < TB; ++t) {
      const float xv = x[t * NC + p];
      if (Z) sz[t] += xv * wz;
      if (Y) sy[t] += xv * wy;
    }
  }
  for (int t = 0; t < TB; ++t) {
    if (Z) std::memcpy(out + t * ldo, &sz[t], sizeof(VZ));
    if (Y) std::memcpy(out + t * ldo + 16 * Z, &sy[t], sizeof(VY));
  }
}

}  // namespace
}  // namespace mhc_cpu
