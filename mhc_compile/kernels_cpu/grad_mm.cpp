// The X gradient of the coeffs backward in one pass: gm = dh_r . phi^T (T, nC) for 4 tokens at a time
// (the register tiles of gemm_tile.h over phi^T packed once per call, the 4 rows kept in L1), its
// epilogue applied to those rows and the result written once, in x's dtype, through the output cache
// (pool.h). aten's mm would write gm to a fresh (T, nC) buffer in the compute type (page faults, then
// an munmap) that the epilogue reads again.
//
//  * coeffs:   gx = r(gm - coef * x)                                   (mhc::coeffs_backward)
//  * boundary: gx = r(g_xn + r(H_pre g_hin) + r(gm - coef * x))        (mhc::boundary_backward; mix.cpp's
//              boundary_gx, the same roundings)
//
// r() rounds to x's dtype (none for float / double). Each output is one chain of multiply-adds over
// k = 0..K-1 (K = 2n+n^2) whatever the tiling and the threads, so the results are deterministic; they
// differ from aten's mm by the summation order only.
#include "gemm_tile.h"

namespace mhc_cpu {
namespace {

constexpr int kGxTokens = 4;  // register tile: 4 tokens x 3 vectors of columns (12 accumulators)
constexpr int kGxVecs = 3;

// The epilogue on gm of one token's row (or part of it).
template <typename scalar_t, typename acc>
struct GxEpilogue {
  using V = typename Lanes<acc>::V;
  static constexpr int W = Lanes<acc>::W;
  const scalar_t* x;     // (T, nC) the streams the gradient is taken at
  const acc* coef;       // (T)
  const scalar_t* gxn;   // (T, nC) the boundary's x_next gradient; null in coeffs mode
  const scalar_t* ghin;  // (T, C) the boundary's h_in gradient
  const acc* hp;         // (T, n) the boundary's H_pre
  scalar_t* out;         // (T, nC)
  int64_t n, C;
  bool ahead;            // touch() on: prefetch_distance() > 0 (mhc_cpu::set_prefetch(0) turns it off)

  // columns [p0, p0 + cnt) of token t, their gm in g: one element at a time
  void run(int64_t t, int64_t p0, int64_t cnt, const acc* g) const {
    const int64_t NC = n * C;
    const acc ct = coef[t];
    const scalar_t* xt = x + t * NC + p0;
    scalar_t* ot = out + t * NC + p0;
    if (gxn == nullptr) {
      for (int64_t q = 0; q < cnt; ++q) ot[q] = scalar_t(g[q] - ct * acc(xt[q]));
      return;
    }
    const scalar_t* gt = gxn + t * NC + p0;
    for (int64_t q = 0; q < cnt;) {  // one run per stream i the columns cross
      const int64_t i = (p0 + q) / C, c = p0 + q - i * C, len = std::min(cnt - q, C - c);
      const acc hi = hp[t * n + i];
      const scalar_t* hrow = ghin + t * C + c;
      for (int64_t j = 0; j < len; ++j) {
        const acc pre_term = acc(scalar_t(hi * acc(hrow[j])));
        const acc c_term = acc(scalar_t(g[q + j] - ct * acc(xt[q + j])));
        ot[q + j] = scalar_t(acc(gt[q + j]) + pre_term + c_term);
      }
      q += len;
    }
  }

  // brings in the lines of columns [p0, p0 + cnt) of token t that row() will read and write (and g_h_in's
  // while p0 < C), so that in a model, where they come from memory, the misses overlap the GEMM instead
  // of stalling row(). x is read (one byte per line, summed into the return value for the caller to
  // keep; volatile, so the loads are not sunk past the GEMM), the rest prefetched: on the AMD EPYC we
  // measured, with x prefetched too the stall stayed, and with every input read it grew (benchmarks.md
  // "Fifth pass"). Off with the forward kernels' prefetch (mhc_cpu::set_prefetch(0), common.h).
  unsigned touch(int64_t t, int64_t p0, int64_t cnt) const {
    const int64_t NC = n * C, bytes = cnt * int64_t(sizeof(scalar_t)), at = (t * NC + p0) * int64_t(sizeof(scalar_t));
    using B = const volatile unsigned char;
    B* xb = reinterpret_cast<B*>(x) + at;
    const char* ob = reinterpret_cast<const char*>(out) + at;
    unsigned sum = 0;
    for (int64_t off = 0; off < bytes; off += 64) {
      sum += xb[off];
      __builtin_prefetch(ob + off, 1, 2);
    }
    if (gxn == nullptr) return sum;
    const char* gb = reinterpret_cast<const char*>(gxn) + at;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(gb + off, 0, 2);
    if (p0 < C) {
      const char* hb = reinterpret_cast<const char*>(ghin + t * C + p0);
      const int64_t hbytes = std::min(cnt, C - p0) * int64_t(sizeof(scalar_t));
      for (int64_t off = 0; off < hbytes; off += 64) __builtin_prefetch(hb + off, 0, 2);
    }
    return sum;
  }

  // the whole row of token t (gm in g): W lanes at a time where x is in the compute type (float,
  // double; the same operations as run() on each lane), run() for the rest
  void row(int64_t t, const acc* g) const {
    if constexpr (std::is_same_v<scalar_t, acc>) {
      const int64_t NC = n * C;
      const acc ct = coef[t];
      const acc *xt = x + t * NC, *gt = gxn + t * NC;
      acc* ot = out + t * NC;
      if (gxn == nullptr) {
        int64_t q = 0;
        for (; q + W <= NC; q += W) {
          V gv, xv;
          std::memcpy(&gv, g + q, sizeof(V));
          std::memcpy(&xv, xt + q, sizeof(V));
          const V o = gv - ct * xv;
          std::memcpy(ot + q, &o, sizeof(V));
        }
        run(t, q, NC - q, g + q);
        return;
      }
      for (int64_t i = 0; i < n; ++i) {
        const acc hi = hp[t * n + i];
        const int64_t base = i * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          V mv, xv, nv, hv;
          std::memcpy(&mv, g + base + c, sizeof(V));
          std::memcpy(&xv, xt + base + c, sizeof(V));
          std::memcpy(&nv, gt + base + c, sizeof(V));
          std::memcpy(&hv, ghin + t * C + c, sizeof(V));
          const V o = nv + hi * hv + (mv - ct * xv);
          std::memcpy(ot + base + c, &o, sizeof(V));
        }
        run(t, base + c, C - c, g + base + c);
      }
      return;
    }
    run(t, 0, n * C, g);
  }
};

// The rows of tokens [t, t + TB): gm column tile by column tile into g (TB rows of stride ldg >= the
// tiles' width), then the epilogue row by row, streaming over x and the output. pt holds phi^T tile by
// tile (kGxVecs vectors of columns each, (K, kGxVecs W) contiguous, the last one padded with zeros).
template <typename acc, int TB, typename Epi>
inline void gx_rows(const acc* d, int64_t K, const acc* pt, int64_t NC, int64_t t, acc* g, int64_t ldg,
                    const Epi& epi) {
  constexpr int64_t W = Lanes<acc>::W, kCols = kGxVecs * W;
  int64_t p0 = 0;
  unsigned touched = 0;
  for (; p0 + kCols <= NC; p0 += kCols, pt += K * kCols) {
    for (int u = 0; u < TB && epi.ahead; ++u) touched += epi.touch(t + u, p0, kCols);
    gemm_tile<acc, TB, kGxVecs>(d, K, pt, kCols, g + p0, ldg);
  }
  asm volatile("" : : "r"(touched));  // the touches stay
  const int64_t rest = NC - p0;  // the last, partial tile: as many vectors as it needs
  static_assert(kGxVecs == 3, "the partial tile below takes 1, 2 or 3 vectors");
  if (rest > 2 * W) gemm_tile<acc, TB, 3>(d, K, pt, kCols, g + p0, ldg);
  else if (rest > W) gemm_tile<acc, TB, 2>(d, K, pt, kCols, g + p0, ldg);
  else if (rest > 0) gemm_tile<acc, TB, 1>(d, K, pt, kCols, g + p0, ldg);
  for (int u = 0; u < TB; ++u) epi.row(t + u, g + u * ldg);
}

// gx (T, n, C) in x's dtype from dh_r (T, K) and phi (nC, K) in the compute type, x (T, n, C), coef (T, 1);
// with g_x_next (T, n, C), g_h_in (T, C) (x's dtype) and h_pre (T, n) the boundary's epilogue.
at::Tensor coeffs_gx(const at::Tensor& dh_, const at::Tensor& phi_, const at::Tensor& x_, const at::Tensor& coef_,
                     const std::optional<at::Tensor>& gxn_, const std::optional<at::Tensor>& ghin_,
                     const std::optional<at::Tensor>& hp_) {
  at::Tensor dh = dh_.contiguous(), phi = phi_.contiguous(), x = x_.contiguous(), coef = coef_.contiguous();
  TORCH_CHECK(x.dim() == 3 && phi.dim() == 2 && dh.dim() == 2, "mhc_cpu::coeffs_gx: x must be (T, n, C), phi (nC, K), dh_r (T, K)");
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2), NC = n * C, K = phi.size(1);
  const auto cd = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(phi.size(0) == NC && dh.size(0) == T && dh.size(1) == K && coef.numel() == T && dh.scalar_type() == cd &&
              phi.scalar_type() == cd && coef.scalar_type() == cd,
              "mhc_cpu::coeffs_gx: dh_r (T, K), phi (nC, K) and coef (T, 1) in the compute type must match x (T, n, C)");
  const bool boundary = gxn_.has_value();
  TORCH_CHECK(boundary == ghin_.has_value() && boundary == hp_.has_value(),
              "mhc_cpu::coeffs_gx: g_x_next, g_h_in and h_pre come together (a boundary) or not at all");
  at::Tensor gxn, ghin, hp;
  if (boundary) {
    gxn = gxn_->contiguous(), ghin = ghin_->contiguous(), hp = hp_->contiguous();
    TORCH_CHECK(gxn.numel() == T * NC && ghin.numel() == T * C && hp.numel() == T * n &&
                gxn.scalar_type() == x.scalar_type() && ghin.scalar_type() == x.scalar_type() && hp.scalar_type() == cd,
                "mhc_cpu::coeffs_gx: g_x_next (T, n, C), g_h_in (T, C) in x's dtype and h_pre (T, n) must match x");
  }
  at::Tensor out = out_empty({T, n, C}, x.options());
  MHC_DISPATCH(x, "mhc_cpu_coeffs_gx", [&] {
    using acc = at::opmath_type<scalar_t>;
    constexpr int64_t kCols = kGxVecs * Lanes<acc>::W;
    const int64_t tiles = (NC + kCols - 1) / kCols;
    std::vector<acc> pt(tiles * K * kCols, acc(0));  // phi^T as gx_rows reads it
    const acc* ph = phi.data_ptr<acc>();
    for (int64_t p = 0; p < NC; ++p) {
      acc* dst = pt.data() + (p / kCols) * K * kCols + p % kCols;
      for (int64_t k = 0; k < K; ++k) dst[k * kCols] = ph[p * K + k];
    }
    const GxEpilogue<scalar_t, acc> epi{x.data_ptr<scalar_t>(), coef.data_ptr<acc>(),
                                        boundary ? gxn.data_ptr<scalar_t>() : nullptr,
                                        boundary ? ghin.data_ptr<scalar_t>() : nullptr,
                                        boundary ? hp.data_ptr<acc>() : nullptr, out.data_ptr<scalar_t>(), n, C,
                                        prefetch_distance() > 0};
    const acc* d = dh.data_ptr<acc>();
    const int64_t ldg = tiles * kCols;
    at::parallel_for(0, T, std::max<int64_t>(kGxTokens, grain(NC * K)), [&](int64_t b, int64_t e) {
      std::vector<acc> g(kGxTokens * ldg);  // gm of the token tile's rows (L1-sized at these shapes)
      int64_t t = b;
      for (; t + kGxTokens <= e; t += kGxTokens) gx_rows<acc, kGxTokens>(d + t * K, K, pt.data(), NC, t, g.data(), ldg, epi);
      for (; t < e; ++t) gx_rows<acc, 1>(d + t * K, K, pt.data(), NC, t, g.data(), ldg, epi);
    });
  });
  return out;
}

// The phi gradient of the coeffs backward, g_phi (nC, K) = flat (T, nC)^T . dh_r (T, K) in the compute
// type, written in phi's layout (aten's mm of dh_r^T and flat, then the transposing copy: 350 us at the
// GPT site shape, T = 512, nC = 1024, K = 24, 1 thread; this kernel 303 us). Threads split the nC
// columns in blocks of kPhiVecs vectors (4 x 8 floats; 3 x 4 and 2 x 6 ran 5-15% slower). Per block,
// tokens go in chunks of kPhiChunk: the chunk's rows of the block are first packed side by side
// (flat's rows are 4 KiB apart at nC = 1024, which maps them all to one L1 set), then kPhiK columns
// of dh_r at a time run kPhiVecs x kPhiK accumulators over the chunk's tokens, the running sums kept
// in a small tile between chunks. Each output is one chain of multiply-adds over t = 0..T-1 in
// order, whatever the threads: deterministic.
constexpr int kPhiVecs = 4;
constexpr int kPhiK = 3;
constexpr int64_t kPhiChunk = 128;

// tile[k0 + kk, :] += sum_t d[t, k0 + kk] xb[t, :] over the cnt packed rows xb (cnt, kPhiVecs W).
template <typename acc>
inline void phi_tile(const acc* xb, int64_t cnt, const acc* d, int64_t Kp, int64_t k0, acc* tile) {
  using V = typename Lanes<acc>::V;
  constexpr int W = Lanes<acc>::W;
  constexpr int PB = kPhiVecs * W;
  V a[kPhiK][kPhiVecs];
  for (int kk = 0; kk < kPhiK; ++kk)
    for (int v = 0; v < kPhiVecs; ++v) std::memcpy(&a[kk][v], tile + (k0 + kk) * PB + v * W, sizeof(V));
  for (int64_t t = 0; t < cnt; ++t) {
    V x[kPhiVecs];
    for (int v = 0; v < kPhiVecs; ++v) std::memcpy(&x[v], xb + t * PB + v * W, sizeof(V));
    for (int kk = 0; kk < kPhiK; ++kk) {
      const acc dv = d[t * Kp + k0 + kk];
      for (int v = 0; v < kPhiVecs; ++v) a[kk][v] += dv * x[v];
    }
  }
  for (int kk = 0; kk < kPhiK; ++kk)
    for (int v = 0; v < kPhiVecs; ++v) std::memcpy(tile + (k0 + kk) * PB + v * W, &a[kk][v], sizeof(V));
}

at::Tensor phi_grad_mm(const at::Tensor& flat_, const at::Tensor& dh_) {
  at::Tensor flat = flat_.contiguous(), dh = dh_.contiguous();
  const int64_t T = flat.size(0), NC = flat.size(1), K = dh.size(1);
  TORCH_CHECK(dh.size(0) == T && dh.scalar_type() == flat.scalar_type(),
              "mhc_cpu::phi_grad_mm: flat (T, nC) and dh_r (T, K) in the compute type must match");
  at::Tensor out = at::empty({NC, K}, flat.options());
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "mhc_cpu_phi_grad_mm", [&] {
    using acc = scalar_t;
    constexpr int64_t PB = kPhiVecs * Lanes<acc>::W;
    const int64_t Kp = (K + kPhiK - 1) / kPhiK * kPhiK;
    std::vector<acc> d(T * Kp, acc(0));  // dh_r with its columns padded to a multiple of kPhiK
    const acc* dsrc = dh.data_ptr<acc>();
    for (int64_t t = 0; t < T; ++t) std::memcpy(&d[t * Kp], dsrc + t * K, K * sizeof(acc));
    const acc* fp = flat.data_ptr<acc>();
    acc* op = out.data_ptr<acc>();
    at::parallel_for(0, (NC + PB - 1) / PB, 1, [&](int64_t b, int64_t e) {
      std::vector<acc> tile(Kp * PB), xb(kPhiChunk * PB, acc(0));
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t p0 = blk * PB, pw = std::min(PB, NC - p0);
        std::fill(tile.begin(), tile.end(), acc(0));
        for (int64_t t0 = 0; t0 < T; t0 += kPhiChunk) {
          const int64_t cnt = std::min(kPhiChunk, T - t0);
          if (pw == PB)  // a constant size: two vector moves per row, inlined
            for (int64_t t = 0; t < cnt; ++t) std::memcpy(&xb[t * PB], fp + (t0 + t) * NC + p0, PB * sizeof(acc));
          else  // the last block: its spare columns stay zero
            for (int64_t t = 0; t < cnt; ++t) std::memcpy(&xb[t * PB], fp + (t0 + t) * NC + p0, pw * sizeof(acc));
          for (int64_t k0 = 0; k0 < Kp; k0 += kPhiK) phi_tile(xb.data(), cnt, &d[t0 * Kp], Kp, k0, tile.data());
        }
        for (int64_t l = 0; l < pw; ++l)
          for (int64_t k = 0; k < K; ++k) op[(p0 + l) * K + k] = tile[k * PB + l];
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace mhc_cpu

TORCH_LIBRARY_FRAGMENT(mhc_cpu, m) {
  m.def("coeffs_gx(Tensor dh_r, Tensor phi, Tensor x, Tensor coef, Tensor? g_x_next=None, Tensor? g_h_in=None, "
        "Tensor? h_pre=None) -> Tensor");
  m.def("phi_grad_mm(Tensor flat, Tensor dh_r) -> Tensor");
}

TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("coeffs_gx", &mhc_cpu::coeffs_gx);
  m.impl("phi_grad_mm", &mhc_cpu::phi_grad_mm);
}
