// Stream mixing on CPU: pre and post_res forward and backward, and the boundary backward's
// one-pass x_next gradient (schemas in coeffs.cpp).
#include "mix_tokens.h"

namespace mhc_cpu {
namespace {

// float, n = N known, one token of post_res_bwd: gx[j] = sum_i R[i, j] g[i], gout = sum_i P[i] g[i],
// gpost[i] = g[i] . h, gres[i, j] = g[i] . x[j], eight lanes at a time with every stream chunk and
// the N^2 + N dot accumulators in registers (one read of g, x and h per token).
template <int N>
inline void post_res_bwd_token_f32(const float* gt, const float* xt, const float* ht, const float* R, const float* P,
                                   float* gx, float* gout, float* gpost, float* gres, int64_t C) {
  typedef float V __attribute__((vector_size(32)));
  constexpr int64_t W = 8;
  V ap[N] = {}, ar[N * N] = {};
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    V gs[N], xs[N], h;
    for (int i = 0; i < N; ++i) { std::memcpy(&gs[i], gt + i * C + c, 32); std::memcpy(&xs[i], xt + i * C + c, 32); }
    std::memcpy(&h, ht + c, 32);
    for (int j = 0; j < N; ++j) {
      V b = R[j] * gs[0];
      for (int i = 1; i < N; ++i) b += R[i * N + j] * gs[i];
      std::memcpy(gx + j * C + c, &b, 32);
    }
    V o = P[0] * gs[0];
    for (int i = 1; i < N; ++i) o += P[i] * gs[i];
    std::memcpy(gout + c, &o, 32);
    for (int i = 0; i < N; ++i) {
      ap[i] += gs[i] * h;
      for (int j = 0; j < N; ++j) ar[i * N + j] += gs[i] * xs[j];
    }
  }
  float sp[N], sr[N * N];
  for (int i = 0; i < N; ++i) {
    sp[i] = 0;
    for (int k = 0; k < W; ++k) sp[i] += ap[i][k];
    for (int j = 0; j < N; ++j) {
      sr[i * N + j] = 0;
      for (int k = 0; k < W; ++k) sr[i * N + j] += ar[i * N + j][k];
    }
  }
  for (; c < C; ++c) {
    for (int j = 0; j < N; ++j) {
      float b = R[j] * gt[c];
      for (int i = 1; i < N; ++i) b += R[i * N + j] * gt[i * C + c];
      gx[j * C + c] = b;
    }
    float o = P[0] * gt[c];
    for (int i = 1; i < N; ++i) o += P[i] * gt[i * C + c];
    gout[c] = o;
    for (int i = 0; i < N; ++i) {
      sp[i] += gt[i * C + c] * ht[c];
      for (int j = 0; j < N; ++j) sr[i * N + j] += gt[i * C + c] * xt[j * C + c];
    }
  }
  for (int i = 0; i < N; ++i) {
    gpost[i] = sp[i];
    for (int j = 0; j < N; ++j) gres[i * N + j] = sr[i * N + j];
  }
}

// float, n = N known, one token of pre_bwd: gx[i] = hp[i] g, gh[i] = g . x[i], eight lanes at a time.
template <int N>
inline void pre_bwd_token_f32(const float* g, const float* xt, const float* h, float* gx, float* gh, int64_t C) {
  typedef float V __attribute__((vector_size(32)));
  constexpr int64_t W = 8;
  V a[N] = {};
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    V gv, xi;
    std::memcpy(&gv, g + c, 32);
    for (int i = 0; i < N; ++i) {
      V o = h[i] * gv;
      std::memcpy(gx + i * C + c, &o, 32);
      std::memcpy(&xi, xt + i * C + c, 32);
      a[i] += gv * xi;
    }
  }
  for (int i = 0; i < N; ++i) {
    float s = 0;
    for (int k = 0; k < W; ++k) s += a[i][k];
    for (int64_t cc = c; cc < C; ++cc) { gx[i * C + cc] = h[i] * g[cc]; s += g[cc] * xt[i * C + cc]; }
    gh[i] = s;
  }
}

// h_in[t, c] = sum_i hp[t, i] x[t, i, c]
at::Tensor pre_fwd(const at::Tensor& x_, const at::Tensor& hp_) {
  at::Tensor x = x_.contiguous(), hp = hp_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2), sh = cstride(hp, T, n);
  at::Tensor out = out_empty({T, C}, x.options());
  MHC_DISPATCH(x, "mhc_cpu_pre_fwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc* hpp = hp.data_ptr<acc>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    if (float_tokens<scalar_t>(n, T, grain(n * C), [&](auto NC_, int64_t t) {
          constexpr int N = decltype(NC_)::value;
          prefetch_ahead(xp, t, T, n * C);
          pre_token_f32<N>(xp + t * n * C, hpp + t * sh, outp + t * C, C);
        }))
      return;
    at::parallel_for(0, T, grain(n * C), [&](int64_t b, int64_t e) {
      std::vector<acc> buf(C);
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* xt = xp + t * n * C;
        const acc* h = hpp + t * sh;
        for (int64_t c = 0; c < C; ++c) buf[c] = h[0] * acc(xt[c]);
        for (int64_t i = 1; i < n; ++i) {
          const acc hi = h[i];
          const scalar_t* xi = xt + i * C;
          for (int64_t c = 0; c < C; ++c) buf[c] += hi * acc(xi[c]);
        }
        scalar_t* o = outp + t * C;
        for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(buf[c]);
      }
    });
  });
  return out;
}

// gx[t, i, c] = hp[t, i] g[t, c];  ghp[t, i] = sum_c g[t, c] x[t, i, c]   (ghp per token)
std::tuple<at::Tensor, at::Tensor> pre_bwd(const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& hp_) {
  at::Tensor g = g_.contiguous(), x = x_.contiguous(), hp = hp_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2), sh = cstride(hp, T, n);
  at::Tensor gx = out_empty({T, n, C}, x.options()), gh = at::empty({T, n}, hp.options());
  MHC_DISPATCH(x, "mhc_cpu_pre_bwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    const acc* hpp = hp.data_ptr<acc>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    acc* ghp = gh.data_ptr<acc>();
    if (float_tokens<scalar_t>(n, T, grain(n * C), [&](auto NC_, int64_t t) {
          constexpr int N = decltype(NC_)::value;
          prefetch_ahead(xp, t, T, n * C), prefetch_ahead(gp, t, T, C);
          pre_bwd_token_f32<N>(gp + t * C, xp + t * n * C, hpp + t * sh, gxp + t * n * C, ghp + t * n, C);
        }))
      return;
    at::parallel_for(0, T, grain(n * C), [&](int64_t b, int64_t e) {
      std::vector<acc> gb(C), xb(C);
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* gt = gp + t * C;
        for (int64_t c = 0; c < C; ++c) gb[c] = acc(gt[c]);
        const acc* h = hpp + t * sh;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* xi = xp + (t * n + i) * C;
          scalar_t* o = gxp + (t * n + i) * C;
          const acc hi = h[i];
          for (int64_t c = 0; c < C; ++c) {
            o[c] = scalar_t(hi * gb[c]);
            xb[c] = acc(xi[c]);
          }
          ghp[t * n + i] = dot(gb.data(), xb.data(), C);
        }
      }
    });
  });
  return {gx, gh};
}

// ghp[t, i] = sum_c g[t, c] x[t, i, c]: the H_pre gradient of pre alone (the boundary backward
// folds pre's x gradient into boundary_gx instead of writing it).
at::Tensor pre_grad_h(const at::Tensor& g_, const at::Tensor& x_) {
  at::Tensor g = g_.contiguous(), x = x_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  TORCH_CHECK(g.numel() == T * C && g.scalar_type() == x.scalar_type(), "mhc_cpu::pre_grad_h: grad must be (T, C) in x's dtype");
  at::Tensor gh = at::empty({T, n}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  MHC_DISPATCH(x, "mhc_cpu_pre_grad_h", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    acc* ghp = gh.data_ptr<acc>();
    at::parallel_for(0, T, grain(n * C), [&](int64_t b, int64_t e) {
      std::vector<acc> gb(C), xb(C);
      for (int64_t t = b; t < e; ++t) {
        for (int64_t c = 0; c < C; ++c) gb[c] = acc(gp[t * C + c]);
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* xi = xp + (t * n + i) * C;
          for (int64_t c = 0; c < C; ++c) xb[c] = acc(xi[c]);
          ghp[t * n + i] = dot(gb.data(), xb.data(), C);
        }
      }
    });
  });
  return gh;
}

// The x_next gradient of a boundary in one pass, rounded as reference.boundary_backward does:
// gx[t,i,c] = r(g_xn + r(hp[t,i] g_hin[t,c]) + r(gmm[t,i*C+c] - coef[t] flat[t,i*C+c])), r() the
// rounding to x's dtype; gmm = dh_r . phi^T (T, nC) and coef (T, 1) in the compute type.
at::Tensor boundary_gx(const at::Tensor& gmm_, const at::Tensor& x_, const at::Tensor& coef_, const at::Tensor& gxn_,
                       const at::Tensor& ghin_, const at::Tensor& hp_) {
  at::Tensor gmm = gmm_.contiguous(), x = x_.contiguous(), coef = coef_.contiguous(), gxn = gxn_.contiguous();
  at::Tensor ghin = ghin_.contiguous(), hp = hp_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  TORCH_CHECK(gmm.numel() == T * n * C && coef.numel() == T && gxn.numel() == T * n * C && ghin.numel() == T * C &&
              hp.numel() == T * n && gxn.scalar_type() == x.scalar_type() && ghin.scalar_type() == x.scalar_type(),
              "mhc_cpu::boundary_gx: shapes or dtypes do not match x (T, n, C)");
  at::Tensor out = out_empty({T, n, C}, x.options());
  MHC_DISPATCH(x, "mhc_cpu_boundary_gx", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *gxp = gxn.data_ptr<scalar_t>(), *ghp = ghin.data_ptr<scalar_t>();
    const acc *gm = gmm.data_ptr<acc>(), *cp = coef.data_ptr<acc>(), *hpp = hp.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(n * C), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const acc ct = cp[t];
        for (int64_t i = 0; i < n; ++i) {
          const acc hi = hpp[t * n + i];
          const int64_t base = (t * n + i) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc pre_term = acc(scalar_t(hi * acc(ghp[t * C + c])));
            const acc c_term = acc(scalar_t(gm[base + c] - ct * acc(xp[base + c])));
            op[base + c] = scalar_t(acc(gxp[base + c]) + pre_term + c_term);
          }
        }
      }
    });
  });
  return out;
}

// out[t, i, c] = sum_j hr[t, i, j] x[t, j, c] + ho[t, i] h_out[t, c]
at::Tensor post_res_fwd(const at::Tensor& x_, const at::Tensor& hout_, const at::Tensor& ho_, const at::Tensor& hr_) {
  at::Tensor x = x_.contiguous(), hout = hout_.contiguous(), ho = ho_.contiguous(), hr = hr_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  const int64_t so = cstride(ho, T, n), sr = cstride(hr, T, n * n);
  TORCH_CHECK(hout.scalar_type() == x.scalar_type(), "mhc_cpu::post_res_fwd: h_out dtype must be x's");
  at::Tensor out = out_empty({T, n, C}, x.options());
  MHC_DISPATCH(x, "mhc_cpu_post_res_fwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *hop = hout.data_ptr<scalar_t>();
    const acc *hpo = ho.data_ptr<acc>(), *hrp = hr.data_ptr<acc>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    if (float_tokens<scalar_t>(n, T, grain(n * n * C), [&](auto NC_, int64_t t) {
          constexpr int N = decltype(NC_)::value;
          prefetch_ahead(xp, t, T, n * C), prefetch_ahead(hop, t, T, C);
          post_res_token_f32<N>(xp + t * n * C, hop + t * C, hrp + t * sr, hpo + t * so, outp + t * n * C, C);
        }))
      return;
    at::parallel_for(0, T, grain(n * n * C), [&](int64_t b, int64_t e) {
      std::vector<acc> xa(n * C), ha(C), buf(C);
      for (int64_t t = b; t < e; ++t)
        post_res_token(xp + t * n * C, hop + t * C, hrp + t * sr, hpo + t * so, outp + t * n * C, n, C, xa.data(),
                       ha.data(), buf.data());
    });
  });
  return out;
}

// gx[t,j,c] = sum_i hr[t,i,j] g[t,i,c]; gout[t,c] = sum_i ho[t,i] g[t,i,c];
// gpost[t,i] = sum_c g[t,i,c] h_out[t,c]; gres[t,i,j] = sum_c g[t,i,c] x[t,j,c]   (per token)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> post_res_bwd(
    const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& hout_, const at::Tensor& ho_, const at::Tensor& hr_) {
  at::Tensor g = g_.contiguous(), x = x_.contiguous(), hout = hout_.contiguous(), ho = ho_.contiguous(), hr = hr_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  const int64_t so = cstride(ho, T, n), sr = cstride(hr, T, n * n);
  TORCH_CHECK(hout.scalar_type() == x.scalar_type() && g.scalar_type() == x.scalar_type(),
              "mhc_cpu::post_res_bwd: grad and h_out dtype must be x's");
  at::Tensor gx = out_empty({T, n, C}, x.options()), gout = out_empty({T, C}, x.options());
  at::Tensor gpost = at::empty({T, n}, ho.options()), gres = at::empty({T, n, n}, hr.options());
  MHC_DISPATCH(x, "mhc_cpu_post_res_bwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *hop = hout.data_ptr<scalar_t>();
    const acc *hpo = ho.data_ptr<acc>(), *hrp = hr.data_ptr<acc>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gop = gout.data_ptr<scalar_t>();
    acc *gpp = gpost.data_ptr<acc>(), *grp = gres.data_ptr<acc>();
    if (float_tokens<scalar_t, 4>(n, T, grain(n * n * C * 2), [&](auto NC_, int64_t t) {  // N^2 + 3N vectors stay in registers
          constexpr int N = decltype(NC_)::value;
          post_res_bwd_token_f32<N>(gp + t * n * C, xp + t * n * C, hop + t * C, hrp + t * sr, hpo + t * so,
                                    gxp + t * n * C, gop + t * C, gpp + t * n, grp + t * n * n, C);
        }))
      return;
    at::parallel_for(0, T, grain(n * n * C * 2), [&](int64_t b, int64_t e) {
      std::vector<acc> ga(n * C), xa(n * C), ha(C), buf(C);
      for (int64_t t = b; t < e; ++t) {
        const scalar_t *gt = gp + t * n * C, *xt = xp + t * n * C;
        for (int64_t k = 0; k < n * C; ++k) { ga[k] = acc(gt[k]); xa[k] = acc(xt[k]); }
        for (int64_t c = 0; c < C; ++c) ha[c] = acc(hop[t * C + c]);
        const acc *R = hrp + t * sr, *P = hpo + t * so;
        for (int64_t j = 0; j < n; ++j) {  // gx row j
          const acc r0 = R[j];
          for (int64_t c = 0; c < C; ++c) buf[c] = r0 * ga[c];
          for (int64_t i = 1; i < n; ++i) {
            const acc rij = R[i * n + j];
            const acc* gi = &ga[i * C];
            for (int64_t c = 0; c < C; ++c) buf[c] += rij * gi[c];
          }
          scalar_t* o = gxp + (t * n + j) * C;
          for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(buf[c]);
        }
        {
          const acc p0 = P[0];
          for (int64_t c = 0; c < C; ++c) buf[c] = p0 * ga[c];
          for (int64_t i = 1; i < n; ++i) {
            const acc pi = P[i];
            const acc* gi = &ga[i * C];
            for (int64_t c = 0; c < C; ++c) buf[c] += pi * gi[c];
          }
          scalar_t* o = gop + t * C;
          for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(buf[c]);
        }
        for (int64_t i = 0; i < n; ++i) {
          const acc* gi = &ga[i * C];
          gpp[t * n + i] = dot(gi, ha.data(), C);
          for (int64_t j = 0; j < n; ++j) grp[(t * n + i) * n + j] = dot(gi, &xa[j * C], C);
        }
      }
    });
  });
  return {gx, gout, gpost, gres};
}

}  // namespace
}  // namespace mhc_cpu

TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("pre_fwd", &mhc_cpu::pre_fwd);
  m.impl("pre_bwd", &mhc_cpu::pre_bwd);
  m.impl("pre_grad_h", &mhc_cpu::pre_grad_h);
  m.impl("boundary_gx", &mhc_cpu::boundary_gx);
  m.impl("post_res_fwd", &mhc_cpu::post_res_fwd);
  m.impl("post_res_bwd", &mhc_cpu::post_res_bwd);
}
