// y = x W^T (+ b) for a few rows of bfloat16 on the CPU: decode-sized products, which PyTorch's bfloat16
// matmul runs well below the machine's memory speed (60 products of SmolLM2 at batch 1: 9.6 ms against
// 6.5 ms here; the weights are read once, the step is bound by reading them). Each output is a float32
// dot product of bfloat16 pairs (AVX512-BF16 `vdpbf16ps`), plus the bias, rounded once to bfloat16 (to
// nearest even), as a float32-accumulating product rounds it; the order of the sum is this kernel's.
// Built only where the CPU has AVX512-BF16 (the build fails elsewhere, and the PyTorch product serves).
// x [M, K] and W [N, K] contiguous, K a multiple of 32; b [N] or null; y [M, N]. Built and loaded by
// server/kernels/__init__.py.
#include <cstdint>
#include <immintrin.h>

#include "bf16.h"

#ifndef __AVX512BF16__
#error "needs AVX512-BF16"
#endif

namespace {

constexpr int64_t NB = 4;  // output rows per inner block: each x chunk is loaded once for NB rows of W

}  // namespace

extern "C" int gemv_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, const uint16_t* W, const uint16_t* b,
                         uint16_t* y, int threads) {
  if (K % 32 != 0) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nn = N - n0 < NB ? N - n0 : NB;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xm = x + m * K;
      __m512 acc[NB];
      for (int64_t j = 0; j < NB; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + k);
        for (int64_t j = 0; j < nn; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], xv, (__m512bh)_mm512_loadu_si512(W + (n0 + j) * K + k));
      }
      for (int64_t j = 0; j < nn; ++j) {
        float s = _mm512_reduce_add_ps(acc[j]);
        if (b != nullptr) s += bfloat::to_float(b[n0 + j]);
        y[m * N + n0 + j] = bfloat::from_float(s);
      }
    }
  }
  return 0;
}
