// LoRA deltas added into a few rows' base outputs on the CPU, each row through its own adapter's blocks,
// for one Linear or a group of sibling Linears that read the same input (q/k/v, gate/up), in one call:
//
//     y_m[t] = round(y_m[t] + sB_m[a_t] (A_m[a_t] x[t]))     for every token t with a_t >= 0, module m
//
// (with the adapter's bias s * b_B in the delta where it has one, and DoRA's scale, see `mods` below)
// computed in float32 (x converted from bfloat16 where it is), the sum rounded once to y's dtype: what
// the PyTorch path does with `y.to(float32) + delta` then `.to(y.dtype)`. A token of no adapter
// (a_t < 0) is not touched. Made for decode-sized batches, where every PyTorch op of the eager path
// (casts, gathers, two batched products, the add, the cast back) costs more in dispatch than in
// arithmetic; it also beats that path on long batches (prefill) up to rank 32, by adding into y in
// place instead of through a float32 copy of it (server/adapters/methods/lora.py says when it is used).
// Tokens, in the order of their adapters, are split over threads for the products A x, output columns for
// the rest. Built and loaded by server/kernels/__init__.py.
//
// `mods`: n_mod, n_ad (the adapters `loc` indexes), then per module its width out_m, its base bias
// (float32 [out_m], or 0: read by DoRA only) and, per adapter, five entries: its A block [r, in]
// (float32, contiguous), its s * B block transposed [r, out_m] (float32, contiguous), r (each adapter at
// its own rank; 0: no block here), DoRA's scale g [out_m] or 0, and s * b_B [out_m] or 0. With g, the
// row's output is y + (g - 1) (y - bias) + g delta, in that order, as PEFT computes DoRA. `ys`: per
// module, y_m and its row stride. x: token t's row at x + t * x_stride. loc [B]: each row's adapter
// (-1: none); token t is of row t / T.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

constexpr int64_t E = 5;        // entries per adapter in `mods`: A, sB, rank, g, s * b_B
constexpr int64_t CHUNK = 128;  // output columns per work item of the expand phase
constexpr int64_t JB = 128;     // output columns accumulated in registers at a time (8 independent sums)

// h[0:R] = A x for A in [R, in] rows: one dot product per rank.
inline void shrink(const float* A, int64_t R, const float* x, int64_t in, float* h) {
  for (int64_t r = 0; r < R; ++r) {
    const float* Ar = A + r * in;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < in; ++k) s += Ar[k] * x[k];
    h[r] = s;
  }
}

// acc[0:w] = sB^T h over the columns j0.. of one adapter's [R, out] block, JB columns at a time.
inline void expand(const float* sB, int64_t out, int64_t R, const float* h, int64_t w, float* acc) {
  int64_t j = 0;
  for (; j + JB <= w; j += JB) {
    float a[JB] = {};
    for (int64_t r = 0; r < R; ++r) {
      const float* Br = sB + r * out + j;
      const float hr = h[r];
#pragma omp simd
      for (int q = 0; q < JB; ++q) a[q] += hr * Br[q];
    }
    for (int q = 0; q < JB; ++q) acc[j + q] = a[q];
  }
  if (j < w) {
    std::fill(acc + j, acc + w, 0.0f);
    for (int64_t r = 0; r < R; ++r) {
      const float* Br = sB + r * out;
      for (int64_t q = j; q < w; ++q) acc[q] += h[r] * Br[q];
    }
  }
}

}  // namespace

extern "C" int lora_rows(int64_t N, int64_t T, int64_t in, const void* x, int x_bf16, int64_t x_stride,
                         const int64_t* loc, const int64_t* mods, const int64_t* ys, int y_bf16, int threads) {
  const int64_t n_mod = mods[0], n_ad = mods[1];
  if (N <= 0 || n_mod <= 0) return 0;
  const int64_t per = 2 + E * n_ad;  // a module's entries in `mods`
  std::vector<int64_t> h_off(n_mod), chunk_off(n_mod + 1, 0);
  int64_t Rsum = 0;
  for (int64_t m = 0; m < n_mod; ++m) {
    const int64_t* d = mods + 2 + per * m;
    int64_t R = 0;
    for (int64_t a = 0; a < n_ad; ++a) R = std::max(R, d[2 + E * a + 2]);
    h_off[m] = Rsum;
    Rsum += R;
    chunk_off[m + 1] = chunk_off[m] + (d[0] + CHUNK - 1) / CHUNK;
  }
  std::vector<float> h(static_cast<size_t>(N * Rsum), 0.0f);  // [N, sum of ranks]: every module's A x
  const int64_t items = chunk_off[n_mod];
  // tokens in the order of their adapters, so the static split below gives each thread the A blocks of fewer
  // adapters to read from memory (16 rows over 8 LoRAs, 120 calls: 5.9 -> 5.2 ms; with JB 128, 4.8)
  std::vector<int64_t> order(static_cast<size_t>(N));
  for (int64_t t = 0; t < N; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return loc[p / T] < loc[q / T]; });
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xf(static_cast<size_t>(in));
    float acc[CHUNK], yf[CHUNK];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const int64_t t = order[i];
      const int64_t a = loc[t / T];
      if (a < 0) continue;
      if (x_bf16) {
        bfloat::widen(static_cast<const uint16_t*>(x) + t * x_stride, xf.data(), in);
      } else {
        std::memcpy(xf.data(), static_cast<const float*>(x) + t * x_stride, sizeof(float) * in);
      }
      for (int64_t m = 0; m < n_mod; ++m) {
        const int64_t* e = mods + 2 + per * m + 2 + E * a;  // this adapter's A, sB, rank, ...
        if (e[2] > 0) shrink(reinterpret_cast<const float*>(e[0]), e[2], xf.data(), in, h.data() + t * Rsum + h_off[m]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      int64_t m = 0;
      while (chunk_off[m + 1] <= item) ++m;
      const int64_t* d = mods + 2 + per * m;
      const int64_t out = d[0];
      const int64_t j0 = (item - chunk_off[m]) * CHUNK, w = std::min(CHUNK, out - j0);
      for (int64_t t = 0; t < N; ++t) {
        const int64_t a = loc[t / T];
        if (a < 0) continue;
        const int64_t* e = d + 2 + E * a;
        if (e[2] == 0) continue;  // no block of this module: the row is left as it is
        expand(reinterpret_cast<const float*>(e[1]) + j0, out, e[2], h.data() + t * Rsum + h_off[m], w, acc);
        if (e[4] != 0) {  // s * b_B joins the delta
          const float* sb = reinterpret_cast<const float*>(e[4]) + j0;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) acc[j] += sb[j];
        }
        float* yv;
        if (y_bf16) {
          bfloat::widen(reinterpret_cast<uint16_t*>(ys[2 * m]) + t * ys[2 * m + 1] + j0, yf, w);
          yv = yf;
        } else {
          yv = reinterpret_cast<float*>(ys[2 * m]) + t * ys[2 * m + 1] + j0;
        }
        if (e[3] != 0) {  // DoRA: y + (g - 1) W x + g delta, W x being y without the base bias
          const float* g = reinterpret_cast<const float*>(e[3]) + j0;
          const float* bb = d[1] != 0 ? reinterpret_cast<const float*>(d[1]) + j0 : nullptr;
          for (int64_t j = 0; j < w; ++j) {
            const float wx = bb != nullptr ? yv[j] - bb[j] : yv[j];
            yv[j] = yv[j] + (g[j] - 1.0f) * wx + g[j] * acc[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) yv[j] += acc[j];
        }
        if (y_bf16) bfloat::narrow(yf, reinterpret_cast<uint16_t*>(ys[2 * m]) + t * ys[2 * m + 1] + j0, w);
      }
    }
  }
  return 0;
}
