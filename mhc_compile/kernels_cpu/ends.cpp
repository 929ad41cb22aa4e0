// A chain's two ends on the CPU, with their outputs from the kernels' output cache (pool.h): the
// expansion of the input into n streams (reference.expand) and the mean or sum over the streams at the
// chain's end (reference.collapse "mean" / "sum"). Each is one pass of copies or adds that aten does as
// well; what differs is the output. aten asks the system for fresh pages on each call (the expansion of a
// GPT's embedding is 2 MiB, over glibc's mmap threshold), and faulting them in cost a converted TinyGPT
// eval forward about 1 ms of its 6 ms over the original (docs/benchmarks.md, "Ninth pass"). Forward
// only: the eager no-grad path of ops.expand / ops.collapse.
#include "common.h"

namespace mhc_cpu {
namespace {

// out[t, i, :] = x[t, :] for i < n: x (T, C), out (T, n, C). Copies, so any dtype, the same bits.
at::Tensor expand_fwd(const at::Tensor& x_, int64_t n) {
  TORCH_CHECK(x_.dim() == 2, "expand_fwd: x must be (T, C), got ", x_.dim(), " dims");
  TORCH_CHECK(n >= 1, "expand_fwd: n must be >= 1, got ", n);
  at::Tensor x = x_.contiguous();
  const int64_t T = x.size(0), C = x.size(1);
  at::Tensor out = out_empty({T, n, C}, x.options());
  const size_t row = size_t(C) * x.element_size();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, T, grain(n * C), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t i = 0; i < n; ++i) std::memcpy(op + (t * n + i) * row, xp + t * row, row);
  });
  return out;
}

// out[t, :] = sum_i x[t, i, :], divided by n when `mean`: x (T, n, C), out (T, C). Added in i order and
// divided in the compute type (float for half / bfloat16), rounded once to x's dtype: the math of aten's
// sum over the stream axis and of its CPU mean (that sum, then a division by n); aten may pair the terms
// differently (a one-token call at n = 8 differs in the last bit).
at::Tensor collapse_fwd(const at::Tensor& x_, bool mean) {
  TORCH_CHECK(x_.dim() == 3, "collapse_fwd: x must be (T, n, C), got ", x_.dim(), " dims");
  at::Tensor x = x_.contiguous();
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  at::Tensor out = out_empty({T, C}, x.options());
  MHC_DISPATCH(x, "mhc_cpu_collapse_fwd", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const acc count = acc(n);
    at::parallel_for(0, T, grain(n * C), [&](int64_t b, int64_t e) {
      std::vector<acc> buf(C);
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* xt = xp + t * n * C;
        for (int64_t c = 0; c < C; ++c) buf[c] = acc(xt[c]);
        for (int64_t i = 1; i < n; ++i) {
          const scalar_t* xi = xt + i * C;
          for (int64_t c = 0; c < C; ++c) buf[c] += acc(xi[c]);
        }
        scalar_t* o = outp + t * C;
        if (mean)
          for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(buf[c] / count);
        else
          for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(buf[c]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace mhc_cpu

TORCH_LIBRARY_FRAGMENT(mhc_cpu, m) {
  m.def("expand_fwd(Tensor x, int n) -> Tensor");
  m.def("collapse_fwd(Tensor x, bool mean) -> Tensor");
}

TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("expand_fwd", &mhc_cpu::expand_fwd);
  m.impl("collapse_fwd", &mhc_cpu::collapse_fwd);
}
