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

}  // namespace
}  // namespace mhc_cpu
