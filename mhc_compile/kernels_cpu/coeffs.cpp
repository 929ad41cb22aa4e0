// mhc::coeffs on CPU after the projection GEMM: RMS, logits, gates and the Sinkhorn loop (forward),
// and its backward with the Sinkhorn replay; plus the schema of every torch.ops.mhc_cpu op.
#include "gates.h"

namespace mhc_cpu {
namespace {

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
        if (hc) {  // one token at a time: z = alpha tanh(h_raw) + b is the gates themselves
          std::vector<acc> h_raw(K), h(K), z(K);
          for (int64_t t = b; t < e; ++t) {
            const acc r = rmp ? rmp[t] : rms_of(fp + t * NC, NC, eps);
            logits_hc(r, pj + t * K, al, bpp, bop, brp, n, h_raw.data(), h.data(), z.data());
            acc *dz = dzp + t * K, *dh = dhp + t * K, *dzh = dzhp + t * K;
            for (int64_t i = 0; i < n; ++i) { dz[i] = gpp[t * n + i]; dz[n + i] = gop[t * n + i]; }
            for (int64_t k = 0; k < nn; ++k) dz[2 * n + k] = grp[t * nn + k];
            acc sdh = 0;
            for (int64_t k = 0; k < K; ++k) {
              const int seg = k < n ? 0 : (k < 2 * n ? 1 : 2);
              dzh[k] = dz[k] * h[k];
              const acc d = al[seg] * dz[k] * (acc(1) - h[k] * h[k]);
              sdh += d * h_raw[k];
              dh[k] = d / r;
            }
            cp[t] = sdh / (acc(NC) * r * r);
          }
          return;
        }
        using V = typename GateLanes<acc>::V;
        constexpr int W = GateLanes<acc>::W;
        // a group of W tokens in lanes: logits, their gradients, the Sinkhorn start, the replay of every
        // step (ic_k, A_k, ir_k, M_k of sk_step) and the gradient g through it
        std::vector<V> h_raw(K), z(K), dz(K), m0(nn), g(nn), s(n), ics(iters * n), irs(iters * n), As(iters * nn),
            Ms(iters * nn);
        const V floor_ = V{} - acc(kSpread);
        for (int64_t t = b; t < e; t += W) {
          const int cnt = int(std::min<int64_t>(W, e - t));
          const V rv = lane_rms<acc>(fp + t * NC, NC, eps, rmp ? rmp + t : nullptr, cnt);
          lane_logits<acc>(rv, pj + t * K, cnt, al, bpp, bop, brp, n, h_raw.data(), z.data());
          for (int64_t i = 0; i < n; ++i) {
            const V sp = vsigm<acc>(z[i]), so = vsigm<acc>(z[n + i]);
            dz[i] = lane_gather(gpp + t * n, n, i, cnt) * sp * (acc(1) - sp);
            dz[n + i] = acc(2) * lane_gather(gop + t * n, n, i, cnt) * so * (acc(1) - so);
          }
          const V* L = z.data() + 2 * n;
          const V mx = sk_start<acc, N>(L, m0.data(), n);
          for (int64_t k = 0; k < nn; ++k) g[k] = lane_gather(grp + t * nn, nn, k, cnt);
          const V* prev = m0.data();
          for (int64_t it = 0; it < iters; ++it) {
            sk_step<V, N>(prev, &ics[it * n], &As[it * nn], &irs[it * n], &Ms[it * nn], n);
            prev = &Ms[it * nn];
          }
          sk_backward<V, N>(g.data(), ics.data(), irs.data(), As.data(), Ms.data(), s.data(), iters, n);
          // d logits of the Sinkhorn start; the max subtraction sends -sum(dz) to the argmax (ties share)
          V total = V{}, ties = V{};
          for (int64_t k = 0; k < nn; ++k) {
            dz[2 * n + k] = (L[k] - mx) >= floor_ ? g[k] * m0[k] : V{};
            total += dz[2 * n + k];
            ties += L[k] == mx ? V{} + acc(1) : V{};
          }
          const V share = total / ties;
          for (int64_t k = 0; k < nn; ++k) dz[2 * n + k] = L[k] == mx ? dz[2 * n + k] - share : dz[2 * n + k];
          // dh_r = alpha dz / r, coef = (alpha dz . h_raw) / (nC r^2), dz * h for alpha's gradient
          V sdh = V{};
          for (int64_t k = 0; k < K; ++k) {
            const int seg = k < n ? 0 : (k < 2 * n ? 1 : 2);
            const V d = al[seg] * dz[k], dzh = dz[k] * h_raw[k], dh = d / rv;
            sdh += d * h_raw[k];
            for (int l = 0; l < cnt; ++l) {
              dzp[(t + l) * K + k] = dz[k][l], dzhp[(t + l) * K + k] = dzh[l], dhp[(t + l) * K + k] = dh[l];
            }
          }
          const V coef = sdh / (acc(NC) * rv * rv);
          for (int l = 0; l < cnt; ++l) cp[t + l] = coef[l];
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
