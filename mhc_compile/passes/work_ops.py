"""Op names (aten / torch / Tensor-method targets) that mix information across positions or
channels: a residual branch containing one of them does real work and its add is a site."""

HEAVY_NAMES = {
    "mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "linear", "conv1d", "conv2d", "conv3d",
    "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "einsum", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "embedding", "tensordot", "addmv", "mv",
    "multi_head_attention_forward", "_native_multi_head_attention", "flex_attention",
    # ops that mix information across positions without a weight: pooling, FFT, scans
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "_adaptive_avg_pool2d",
    "fft_fft", "fft_ifft", "fft_rfft", "fft_irfft", "fft_fft2", "fft_rfft2", "fft_irfft2",
    "fft_fftn", "fft_rfftn", "fft_irfftn", "_fft_r2c", "_fft_c2r", "_fft_c2c",
    "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
}
