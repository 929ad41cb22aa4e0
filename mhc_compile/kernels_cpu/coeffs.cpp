// mhc::coeffs on CPU after the projection GEMM: RMS, logits, gates and the Sinkhorn loop (forward),
// and its backward with the Sinkhorn replay; plus the schema of every torch.ops.mhc_cpu op.
#include "gates.h"

namespace mhc_cpu {
namespace {

// Backward through the Sinkhorn steps, last to first, in place on g (n x n), from the stored
// column sums cs, row sums rs, A and M of every step (sk_step's outputs); s is n scratch.
template <typename acc, int N>
inline void sk_backward(acc* g, const acc* cs, const acc* rs, const acc* As, const acc* Ms, acc* s, int64_t iters,
                        int64_t n_rt) {
  const int64_t n = N ? N : n_rt, nn = n * n;
  for (int64_t it = iters - 1; it >= 0; --it) {
    const acc *c = cs + it * n, *r = rs + it * n, *A = As + it * nn, *M = Ms + it * nn;
    for (int64_t i = 0; i < n; ++i) {  // M = A / rowsum(A)
      acc sum{};
      for (int64_t j = 0; j < n; ++j) sum += g[i * n + j] * M[i * n + j];
      for (int64_t j = 0; j < n; ++j) g[i * n + j] = (g[i * n + j] - sum) / r[i];
    }
    for (int64_t j = 0; j < n; ++j) s[j] = g[j] * A[j];  // A = M_prev / colsum(M_prev)
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) s[j] += g[i * n + j] * A[i * n + j];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) g[i * n + j] = (g[i * n + j] - s[j]) / c[j];
  }
}

// Forward of dynamic mhc::coeffs after the projection: flat = vec(X) (T, nC) and proj = flat . phi
// (T, K), both in the compute type -> H_pre (T,n), H_post (T,n), H_res (T,n,n).
std::tuple<at::Tensor, at::Tensor, at::Tensor> coeffs_fwd(
    const at::Tensor& flat_, const at::Tensor& proj_, const at::Tensor& alpha_, const at::Tensor& bp_,
    const at::Tensor& bo_, const at::Tensor& br_, double eps, int64_t n, int64_t iters, bool hc) {
  at::Tensor flat = flat_.contiguous(), proj = proj_.contiguous(), alpha = alpha_.contiguous();
  at::Tensor bp = bp_.contiguous(), bo = bo_.contiguous(), br = br_.contiguous();
  const int64_t T = flat.size(0), NC = flat.size(1), nn = n * n, K = 2 * n + nn;
  TORCH_CHECK(proj.size(0) == T && proj.size(1) == K && alpha.numel() == 3 && bp.numel() == n && bo.numel() == n &&
              br.numel() == nn, "mhc_cpu::coeffs_fwd: shapes do not match (T, 2n+n^2)");
  at::Tensor hp = at::empty({T, n}, flat.options()), ho = at::empty({T, n}, flat.options());
  at::Tensor hr = at::empty({T, n, n}, flat.options());
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "mhc_cpu_coeffs_fwd", [&] {
    using acc = scalar_t;
    const acc *fp = flat.data_ptr<acc>(), *pj = proj.data_ptr<acc>(), *al = alpha.data_ptr<acc>();
    const acc *bpp = bp.data_ptr<acc>(), *bop = bo.data_ptr<acc>(), *brp = br.data_ptr<acc>();
    acc *pp = hp.data_ptr<acc>(), *op = ho.data_ptr<acc>(), *rp = hr.data_ptr<acc>();
    with_n(n, [&](auto NC_) {
      constexpr int N = decltype(NC_)::value;
      at::parallel_for(0, T, grain(iters * nn * 4 + NC), [&](int64_t b, int64_t e) {
        GateScratch<acc> s(n);
        gates_range<acc, N>(fp + b * NC, NC, pj + b * K, al, bpp, bop, brp, n, eps, iters, hc, pp + b * n, op + b * n,
                            rp + b * nn, e - b, s);
      });
    });
  });
  return {hp, ho, hr};
}

// Backward of coeffs_fwd. Returns (dh_r (T,K), coef (T,1), g_alpha (3), g_b_pre (n), g_b_post (n),
// g_b_res (n,n)) with dh = d loss / d h_raw, dh_r = dh / r and coef = (dh . h_raw) / (nC r^2), so that
// d loss / d flat = dh_r . phi^T - coef * flat and d loss / d phi = flat^T . dh_r (the caller's GEMMs).
// The token sums (biases, alpha) are reduced in token order after the parallel part: deterministic.
std::vector<at::Tensor> coeffs_bwd(
    const at::Tensor& gp_, const at::Tensor& go_, const at::Tensor& gr_, const at::Tensor& flat_,
    const at::Tensor& proj_, const at::Tensor& alpha_, const at::Tensor& bp_, const at::Tensor& bo_,
    const at::Tensor& br_, double eps, int64_t n, int64_t iters, bool hc, const std::optional<at::Tensor>& rms_) {
  at::Tensor gp = gp_.contiguous(), go = go_.contiguous(), gr = gr_.contiguous();
  at::Tensor flat = flat_.contiguous(), proj = proj_.contiguous(), alpha = alpha_.contiguous();
  at::Tensor bp = bp_.contiguous(), bo = bo_.contiguous(), br = br_.contiguous();
  const int64_t T = flat.size(0), NC = flat.size(1), nn = n * n, K = 2 * n + nn;
  TORCH_CHECK(proj.size(0) == T && proj.size(1) == K && gp.numel() == T * n && go.numel() == T * n &&
              gr.numel() == T * nn, "mhc_cpu::coeffs_bwd: shapes do not match (T, 2n+n^2)");
  at::Tensor rms = rms_.has_value() ? rms_->contiguous() : at::Tensor();
  TORCH_CHECK(!rms.defined() || (rms.numel() == T && rms.scalar_type() == flat.scalar_type()),
              "mhc_cpu::coeffs_bwd: rms must hold one value per token in the compute type");
  at::Tensor dh_r = at::empty({T, K}, flat.options()), coef = at::empty({T, 1}, flat.options());
  at::Tensor dz_all = at::empty({T, K}, flat.options()), dzh_all = at::empty({T, K}, flat.options());
  at::Tensor g_alpha = at::empty({3}, flat.options()), g_bp = at::empty({n}, flat.options());
  at::Tensor g_bo = at::empty({n}, flat.options()), g_br = at::empty({n, n}, flat.options());
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "mhc_cpu_coeffs_bwd", [&] {
    using acc = scalar_t;
    const acc *fp = flat.data_ptr<acc>(), *pj = proj.data_ptr<acc>(), *al = alpha.data_ptr<acc>();
    const acc *bpp = bp.data_ptr<acc>(), *bop = bo.data_ptr<acc>(), *brp = br.data_ptr<acc>();
    const acc *gpp = gp.data_ptr<acc>(), *gop = go.data_ptr<acc>(), *grp = gr.data_ptr<acc>();
    acc *dhp = dh_r.data_ptr<acc>(), *cp = coef.data_ptr<acc>(), *dzp = dz_all.data_ptr<acc>(), *dzhp = dzh_all.data_ptr<acc>();
    const acc* rmp = rms.defined() ? rms.data_ptr<acc>() : nullptr;  // the forward's r: no read of the row
    with_n(n, [&](auto NC_) {
      constexpr int N = decltype(NC_)::value;
      at::parallel_for(0, T, grain(iters * nn * 10 + NC), [&](int64_t b, int64_t e) {
        using V = typename Lanes<acc>::V;
        constexpr int W = Lanes<acc>::W;
        // per lane: logits and their pieces, the Sinkhorn start m0 and its max, then g
        std::vector<acc> h_raw(W * K), h(W * K), z(W * K), rr(W), mx(W), m0(W * nn), g(W * nn), s(n);
        // Sinkhorn replay, per iteration k: column sums c_k, A_k = M_{k-1}/c_k, row sums r_k, M_k = A_k/r_k
        std::vector<acc> cs(iters * n), rs(iters * n), As(iters * nn), Ms(iters * nn);
        std::vector<V> csv, rsv, Asv, Msv, m0v, gv, sv;
        if (!hc) csv.resize(iters * n), rsv.resize(iters * n), Asv.resize(iters * nn), Msv.resize(iters * nn),
                 m0v.resize(nn), gv.resize(nn), sv.resize(n);

        auto prepare = [&](int64_t t, int l) {  // logits, gate gradients, Sinkhorn start of token t into lane l
          acc *zl = &z[l * K], *dz = dzp + t * K;
          rr[l] = rmp ? logits_of_rms(rmp[t], pj + t * K, al, bpp, bop, brp, n, hc, &h_raw[l * K], &h[l * K], zl)
                      : logits(fp + t * NC, NC, pj + t * K, al, bpp, bop, brp, n, eps, hc, &h_raw[l * K], &h[l * K], zl);
          if (hc) {
            for (int64_t i = 0; i < n; ++i) { dz[i] = gpp[t * n + i]; dz[n + i] = gop[t * n + i]; }
            for (int64_t k = 0; k < nn; ++k) dz[2 * n + k] = grp[t * nn + k];
            return;
          }
          for (int64_t i = 0; i < n; ++i) {
            const acc sp = sigm(zl[i]), so = sigm(zl[n + i]);
            dz[i] = gpp[t * n + i] * sp * (acc(1) - sp);
            dz[n + i] = acc(2) * gop[t * n + i] * so * (acc(1) - so);
          }
          mx[l] = sk_start<acc, N>(zl + 2 * n, &m0[l * nn], n);
          for (int64_t k = 0; k < nn; ++k) g[l * nn + k] = grp[t * nn + k];
        };
        auto finish = [&](int64_t t, int l) {  // d logits of the Sinkhorn start, then dh_r, coef, dz*h
          acc* dz = dzp + t * K;
          const acc *zl = &z[l * K], *hl = &h[l * K], *hrl = &h_raw[l * K];
          if (!hc) {
            const acc* L = zl + 2 * n;
            acc* dr = dz + 2 * n;
            acc total = 0, ties = 0;
            for (int64_t k = 0; k < nn; ++k) {
              dr[k] = (L[k] - mx[l] >= acc(-kSpread)) ? g[l * nn + k] * m0[l * nn + k] : acc(0);
              total += dr[k];
              ties += (L[k] == mx[l]) ? acc(1) : acc(0);
            }
            for (int64_t k = 0; k < nn; ++k)
              if (L[k] == mx[l]) dr[k] -= total / ties;  // max subtraction: -sum(dz) to the argmax (ties share)
          }
          acc *dh = dhp + t * K, *dzh = dzhp + t * K;
          acc sdh = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int seg = k < n ? 0 : (k < 2 * n ? 1 : 2);
            dzh[k] = dz[k] * hl[k];
            acc d = al[seg] * dz[k];
            if (hc) d = d * (acc(1) - hl[k] * hl[k]);
            sdh += d * hrl[k];
            dh[k] = d / rr[l];
          }
          cp[t] = sdh / (acc(NC) * rr[l] * rr[l]);
        };

        int64_t t = b;
        if (!hc) {
          for (; t + W <= e; t += W) {
            for (int l = 0; l < W; ++l) prepare(t + l, l);
            for (int64_t k = 0; k < nn; ++k)
              for (int l = 0; l < W; ++l) { m0v[k][l] = m0[l * nn + k]; gv[k][l] = g[l * nn + k]; }
            const V* prev = m0v.data();
            for (int64_t it = 0; it < iters; ++it) {
              sk_step<V, N>(prev, &csv[it * n], &Asv[it * nn], &rsv[it * n], &Msv[it * nn], n);
              prev = &Msv[it * nn];
            }
            sk_backward<V, N>(gv.data(), csv.data(), rsv.data(), Asv.data(), Msv.data(), sv.data(), iters, n);
            for (int64_t k = 0; k < nn; ++k)
              for (int l = 0; l < W; ++l) g[l * nn + k] = gv[k][l];
            for (int l = 0; l < W; ++l) finish(t + l, l);
          }
        }
        for (; t < e; ++t) {
          prepare(t, 0);
          if (!hc) {
            const acc* prev = m0.data();
            for (int64_t it = 0; it < iters; ++it) {
              sk_step<acc, N>(prev, &cs[it * n], &As[it * nn], &rs[it * n], &Ms[it * nn], n);
              prev = &Ms[it * nn];
            }
            sk_backward<acc, N>(g.data(), cs.data(), rs.data(), As.data(), Ms.data(), s.data(), iters, n);
          }
          finish(t, 0);
        }
      });
    });
    // token sums in token order
    std::vector<acc> sb(K, acc(0)), sa(K, acc(0));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) { sb[k] += dzp[t * K + k]; sa[k] += dzhp[t * K + k]; }
    acc* ga = g_alpha.data_ptr<acc>();
    ga[0] = ga[1] = ga[2] = 0;
    for (int64_t k = 0; k < K; ++k) ga[k < n ? 0 : (k < 2 * n ? 1 : 2)] += sa[k];
    for (int64_t i = 0; i < n; ++i) { g_bp.data_ptr<acc>()[i] = sb[i]; g_bo.data_ptr<acc>()[i] = sb[n + i]; }
    for (int64_t k = 0; k < nn; ++k) g_br.data_ptr<acc>()[k] = sb[2 * n + k];
  });
  return {dh_r, coef, g_alpha, g_bp, g_bo, g_br};
}
}  // namespace
}  // namespace mhc_cpu

TORCH_LIBRARY(mhc_cpu, m) {
  m.def("coeffs_fwd(Tensor flat, Tensor proj, Tensor alpha, Tensor b_pre, Tensor b_post, Tensor b_res, float eps, int n, "
        "int iters, bool hc) -> (Tensor, Tensor, Tensor)");
  m.def("coeffs_bwd(Tensor g_pre, Tensor g_post, Tensor g_res, Tensor flat, Tensor proj, Tensor alpha, Tensor b_pre, "
        "Tensor b_post, Tensor b_res, float eps, int n, int iters, bool hc, Tensor? rms=None) -> Tensor[]");
  m.def("pre_fwd(Tensor x, Tensor h_pre) -> Tensor");
  m.def("pre_bwd(Tensor grad, Tensor x, Tensor h_pre) -> (Tensor, Tensor)");
  m.def("pre_grad_h(Tensor grad, Tensor x) -> Tensor");
  m.def("boundary_gx(Tensor gmm, Tensor x, Tensor coef, Tensor g_x_next, Tensor g_h_in, Tensor h_pre) -> Tensor");
  m.def("post_res_fwd(Tensor x, Tensor h_out, Tensor h_post, Tensor h_res) -> Tensor");
  m.def("post_res_bwd(Tensor grad, Tensor x, Tensor h_out, Tensor h_post, Tensor h_res) -> (Tensor, Tensor, Tensor, Tensor)");
}


TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("coeffs_fwd", &mhc_cpu::coeffs_fwd);
  m.impl("coeffs_bwd", &mhc_cpu::coeffs_bwd);
}
