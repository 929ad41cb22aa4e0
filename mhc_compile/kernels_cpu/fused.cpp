// The forward of mhc::boundary in one pass over the streams per block of tokens: post_res of site l
// (x_next = H_res x + H_post h_out), then, while the block's x_next rows are in cache, the phi
// projection of site l+1 (a register-blocked GEMM of our own), RMS, gates, the Sinkhorn loop and the
// pre mix h_in = sum_i H_pre[i] x_next[i]. The launcher otherwise reads x_next three more times (the
// aten GEMM, coeffs_fwd's RMS, pre_fwd). Same per-token code as mix.cpp / coeffs.cpp (mix_tokens.h,
// gates.h), so x_next, h_in and the gates given the projection are the same bits as theirs; the
// projection's summation order is this file's (fixed per token: results do not depend on threads).
// The same pass without the post_res (site_start_fwd) is a site's start: coeffs and pre on x.
#include "gemm_tile.h"
#include "mix_tokens.h"

namespace mhc_cpu {
namespace {

constexpr int64_t kBlock = 16;  // tokens per block: 16 x (n C) values stay in L2 between the passes
constexpr int kTileTokens = 4;  // register tile of the GEMM: 4 tokens x up to 3 vectors of outputs
constexpr int kTileVecs = 3;
constexpr int kWideTokens = 8;  // gemm_tile_wide's tile: 8 tokens x (16 + 8) outputs

template <typename acc, int TB>
inline void gemm_tile_kv(int kv, const acc* x, int64_t NC, const acc* ph, int64_t ldp, acc* out, int64_t ldo) {
  switch (kv) {
    case 1: gemm_tile<acc, TB, 1>(x, NC, ph, ldp, out, ldo); break;
    case 2: gemm_tile<acc, TB, 2>(x, NC, ph, ldp, out, ldo); break;
    default: gemm_tile<acc, TB, kTileVecs>(x, NC, ph, ldp, out, ldo);
  }
}

// Whether gemm_block takes gemm_tile_wide (on; mhc_cpu::set_wide_gemm(false) turns it off, for benchmarks).
inline bool& wide_gemm() {
  static bool on = true;
  return on;
}

template <int TB>
inline void gemm_tile_wide_k(int64_t Kp, const float* x, int64_t NC, const float* ph, float* out) {
  switch (Kp) {
    case 8: gemm_tile_wide<TB, 0, 1>(x, NC, ph, Kp, out, Kp); break;
    case 16: gemm_tile_wide<TB, 1, 0>(x, NC, ph, Kp, out, Kp); break;
    default: gemm_tile_wide<TB, 1, 1>(x, NC, ph, Kp, out, Kp);
  }
}

// out (count, Kp) = x (count, NC) . ph (NC, Kp), Kp a multiple of the vector width.
template <typename acc>
inline void gemm_block(const acc* x, int64_t NC, const acc* ph, int64_t Kp, int64_t count, acc* out) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<acc, float>) {
    if (Kp <= 24 && wide_gemm()) {  // gemm_tile_wide: n <= 4
      int64_t t = 0;
      for (; t + kWideTokens <= count; t += kWideTokens) gemm_tile_wide_k<kWideTokens>(Kp, x + t * NC, NC, ph, out + t * Kp);
      for (; t < count; ++t) gemm_tile_wide_k<1>(Kp, x + t * NC, NC, ph, out + t * Kp);
      return;
    }
  }
#endif
  constexpr int W = Lanes<acc>::W;
  const int64_t nv = Kp / W;
  for (int64_t v0 = 0; v0 < nv; v0 += kTileVecs) {
    const int kv = int(std::min<int64_t>(kTileVecs, nv - v0));
    int64_t t = 0;
    for (; t + kTileTokens <= count; t += kTileTokens)
      gemm_tile_kv<acc, kTileTokens>(kv, x + t * NC, NC, ph + v0 * W, Kp, out + t * Kp + v0 * W, Kp);
    for (; t < count; ++t) gemm_tile_kv<acc, 1>(kv, x + t * NC, NC, ph + v0 * W, Kp, out + t * Kp + v0 * W, Kp);
  }
}

// pre of one token, generic dtype / n: mix.cpp pre_fwd's generic loop.
template <typename scalar_t, typename acc>
inline void pre_token(const scalar_t* xt, const acc* h, scalar_t* o, int64_t n, int64_t C, acc* buf) {
  for (int64_t c = 0; c < C; ++c) buf[c] = h[0] * acc(xt[c]);
  for (int64_t i = 1; i < n; ++i) {
    const acc hi = h[i];
    const scalar_t* xi = xt + i * C;
    for (int64_t c = 0; c < C; ++c) buf[c] += hi * acc(xi[c]);
  }
  for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(buf[c]);
}

// One pass per block of tokens over the streams a site reads: with `mix` (a boundary), first post_res of
// x (T,n,C) with h_out (T,C) and site l's h_post (1|T, n), h_res (1|T, n, n) into x_next; then, on
// x_next (or x itself without `mix`: a site's start), the projection, mhc::coeffs and pre of the
// site. phi (nC, K) and the small parameters in the compute type. Returns
// (x_next (T,n,C) or undefined, H_pre (T,n), H_post (T,n), H_res (T,n,n), h_in (T,C), proj (T,K)).
std::vector<at::Tensor> streams_fwd(bool mix, const at::Tensor& x_, const at::Tensor& hout_, const at::Tensor& hpo_,
                                    const at::Tensor& hre_, const at::Tensor& phi_, const at::Tensor& alpha_,
                                    const at::Tensor& bp_, const at::Tensor& bo_, const at::Tensor& br_, double eps,
                                    int64_t iters, bool hc) {
  at::Tensor x = x_.contiguous(), phi = phi_.contiguous(), alpha = alpha_.contiguous(), bp = bp_.contiguous();
  at::Tensor bo = bo_.contiguous(), br = br_.contiguous(), hout, hpo, hre;
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2), NC = n * C, nn = n * n, K = 2 * n + nn;
  const auto cd = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(phi.size(0) == NC && phi.size(1) == K && phi.scalar_type() == cd && alpha.numel() == 3 &&
              bp.numel() == n && bo.numel() == n && br.numel() == nn,
              "mhc_cpu: the site's parameters do not match x (T, n, C)");
  int64_t so = 0, sr = 0;
  at::Tensor xn;
  if (mix) {
    hout = hout_.contiguous(), hpo = hpo_.contiguous(), hre = hre_.contiguous();
    so = cstride(hpo, T, n), sr = cstride(hre, T, nn);
    TORCH_CHECK(hout.numel() == T * C && hout.scalar_type() == x.scalar_type(),
                "mhc_cpu::boundary_fwd: h_out does not match x (T, n, C)");
    xn = out_empty({T, n, C}, x.options());
  }
  at::Tensor hin = out_empty({T, C}, x.options());
  const auto copt = x.options().dtype(cd);
  at::Tensor hp = at::empty({T, n}, copt), ho = at::empty({T, n}, copt), hr = at::empty({T, n, n}, copt);
  at::Tensor proj = at::empty({T, K}, copt), rms = at::empty({T}, copt);
  MHC_DISPATCH(x, "mhc_cpu_boundary_fwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    constexpr bool kF32 = std::is_same_v<scalar_t, float>;
    constexpr int64_t W = Lanes<acc>::W;
    const int64_t Kp = (K + W - 1) / W * W;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* hop = mix ? hout.data_ptr<scalar_t>() : nullptr;
    const acc *hpop = mix ? hpo.data_ptr<acc>() : nullptr, *hrep = mix ? hre.data_ptr<acc>() : nullptr;
    const acc *al = alpha.data_ptr<acc>(), *bpp = bp.data_ptr<acc>(), *bop = bo.data_ptr<acc>(), *brp = br.data_ptr<acc>();
    scalar_t* xnp = mix ? xn.data_ptr<scalar_t>() : nullptr;
    scalar_t* hinp = hin.data_ptr<scalar_t>();
    const scalar_t* src = mix ? xnp : xp;  // the streams the site reads
    acc *pp = hp.data_ptr<acc>(), *op = ho.data_ptr<acc>(), *rp = hr.data_ptr<acc>(), *pj = proj.data_ptr<acc>();
    acc* rmsp = rms.data_ptr<acc>();
    std::vector<acc> packed;  // phi with its K columns padded to Kp (zeros)
    const acc* ph = phi.data_ptr<acc>();
    if (Kp != K) {
      packed.assign(NC * Kp, acc(0));
      for (int64_t p = 0; p < NC; ++p) std::memcpy(&packed[p * Kp], ph + p * K, K * sizeof(acc));
      ph = packed.data();
    }
    with_n(n, [&](auto NC_) {
      constexpr int N = decltype(NC_)::value;
      at::parallel_for(0, T, kBlock, [&](int64_t b, int64_t e) {
        GateScratch<acc> s(n);
        std::vector<acc> pb(kBlock * Kp), xa(kF32 && N ? 0 : kBlock * NC), ha(C), buf(C);
        for (int64_t t0 = b; t0 < e; t0 += kBlock) {
          const int64_t cnt = std::min(kBlock, e - t0);
          for (int64_t t = t0; mix && t < t0 + cnt; ++t) {
            prefetch_ahead(xp, t, T, NC), prefetch_ahead(hop, t, T, C);
            if constexpr (kF32 && N > 0)
              post_res_token_f32<N>(xp + t * NC, hop + t * C, hrep + t * sr, hpop + t * so, xnp + t * NC, C);
            else
              post_res_token(xp + t * NC, hop + t * C, hrep + t * sr, hpop + t * so, xnp + t * NC, n, C,
                             &xa[(t - t0) * NC], ha.data(), buf.data());
          }
          const acc* fb;  // vec(x_next) (or vec(x) at a site's start) rows of the block in the compute type
          if constexpr (kF32) {
            fb = src + t0 * NC;
          } else {
            for (int64_t k = 0; k < cnt * NC; ++k) xa[k] = acc(src[t0 * NC + k]);
            fb = xa.data();
          }
          gemm_block(fb, NC, ph, Kp, cnt, pb.data());
          for (int64_t t = 0; t < cnt; ++t) std::memcpy(pj + (t0 + t) * K, &pb[t * Kp], K * sizeof(acc));
          gates_range<acc, N>(fb, NC, pj + t0 * K, al, bpp, bop, brp, n, eps, iters, hc, pp + t0 * n, op + t0 * n,
                              rp + t0 * nn, cnt, s, rmsp + t0);
          for (int64_t t = t0; t < t0 + cnt; ++t) {
            if constexpr (kF32 && N > 0)
              pre_token_f32<N>(src + t * NC, pp + t * n, hinp + t * C, C);
            else
              pre_token(src + t * NC, pp + t * n, hinp + t * C, n, C, buf.data());
          }
        }
      });
    });
  });
  return {xn, hp, ho, hr, hin, proj, rms};
}

// mhc::boundary's forward: (x_next, H_pre, H_post, H_res, h_in, proj, rms) of site l+1 (streams_fwd with
// mix); rms (T) is each token's RMS r of x_next, which coeffs_bwd may take back.
std::vector<at::Tensor> boundary_fwd(const at::Tensor& x, const at::Tensor& hout, const at::Tensor& hpo,
                                     const at::Tensor& hre, const at::Tensor& phi, const at::Tensor& alpha,
                                     const at::Tensor& bp, const at::Tensor& bo, const at::Tensor& br, double eps,
                                     int64_t iters, bool hc) {
  return streams_fwd(true, x, hout, hpo, hre, phi, alpha, bp, bo, br, eps, iters, hc);
}

// A site's start, mhc::coeffs and pre on x in one pass per token block: (H_pre, H_post, H_res, h_in, proj,
// rms), the bits of proj_mm, coeffs_fwd and pre_fwd in turn (rms as for boundary_fwd).
std::vector<at::Tensor> site_start_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                                       const at::Tensor& bp, const at::Tensor& bo, const at::Tensor& br, double eps,
                                       int64_t iters, bool hc) {
  auto out = streams_fwd(false, x, at::Tensor(), at::Tensor(), at::Tensor(), phi, alpha, bp, bo, br, eps, iters, hc);
  out.erase(out.begin());
  return out;
}

// proj (T, K) = flat (T, nC) . phi (nC, K) in the compute type, with boundary_fwd's GEMM (the same
// bits per token): the projection recomputed by a backward that did not keep it.
at::Tensor proj_mm(const at::Tensor& flat_, const at::Tensor& phi_) {
  at::Tensor flat = flat_.contiguous(), phi = phi_.contiguous();
  const int64_t T = flat.size(0), NC = flat.size(1), K = phi.size(1);
  TORCH_CHECK(phi.size(0) == NC && phi.scalar_type() == flat.scalar_type(), "mhc_cpu::proj_mm: shapes do not match");
  at::Tensor proj = at::empty({T, K}, flat.options());
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "mhc_cpu_proj_mm", [&] {
    using acc = scalar_t;
    constexpr int64_t W = Lanes<acc>::W;
    const int64_t Kp = (K + W - 1) / W * W;
    const acc *fp = flat.data_ptr<acc>(), *ph = phi.data_ptr<acc>();
    acc* pj = proj.data_ptr<acc>();
    std::vector<acc> packed;
    if (Kp != K) {
      packed.assign(NC * Kp, acc(0));
      for (int64_t p = 0; p < NC; ++p) std::memcpy(&packed[p * Kp], ph + p * K, K * sizeof(acc));
      ph = packed.data();
    }
    at::parallel_for(0, T, kBlock, [&](int64_t b, int64_t e) {
      std::vector<acc> pb(kBlock * Kp);
      for (int64_t t0 = b; t0 < e; t0 += kBlock) {
        const int64_t cnt = std::min(kBlock, e - t0);
        gemm_block(fp + t0 * NC, NC, ph, Kp, cnt, pb.data());
        for (int64_t t = 0; t < cnt; ++t) std::memcpy(pj + (t0 + t) * K, &pb[t * Kp], K * sizeof(acc));
      }
    });
  });
  return proj;
}

}  // namespace

int64_t pool_release() { return OutputPool::get().release(); }
std::vector<int64_t> pool_stats() { return OutputPool::get().stats(); }
int64_t pool_set_budget(int64_t bytes) { return OutputPool::get().set_budget(bytes); }
bool set_wide_gemm(bool on) {
  const bool old = wide_gemm();
  wide_gemm() = on;
  return old;
}
int64_t set_prefetch(int64_t tokens) {
  const int64_t old = prefetch_distance();
  prefetch_distance() = std::max<int64_t>(0, tokens);
  return old;
}

}  // namespace mhc_cpu

TORCH_LIBRARY_FRAGMENT(mhc_cpu, m) {
  m.def("pool_release() -> int", &mhc_cpu::pool_release);
  m.def("pool_stats() -> int[]", &mhc_cpu::pool_stats);
  m.def("pool_set_budget(int bytes) -> int", &mhc_cpu::pool_set_budget);
  m.def("set_prefetch(int tokens) -> int", &mhc_cpu::set_prefetch);
  m.def("set_wide_gemm(bool on) -> bool", &mhc_cpu::set_wide_gemm);
  m.def("boundary_fwd(Tensor x, Tensor h_out, Tensor h_post, Tensor h_res, Tensor phi, Tensor alpha, Tensor b_pre, "
        "Tensor b_post, Tensor b_res, float eps, int iters, bool hc) -> Tensor[]");
  m.def("proj_mm(Tensor flat, Tensor phi) -> Tensor");
  m.def("site_start_fwd(Tensor x, Tensor phi, Tensor alpha, Tensor b_pre, Tensor b_post, Tensor b_res, float eps, "
        "int iters, bool hc) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("boundary_fwd", &mhc_cpu::boundary_fwd);
  m.impl("proj_mm", &mhc_cpu::proj_mm);
  m.impl("site_start_fwd", &mhc_cpu::site_start_fwd);
}
