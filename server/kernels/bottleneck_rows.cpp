// Bottleneck adapters (seq_bn, par_bn and their like) at one residual add, a few tokens at a time, each
// row through its own adapter's blocks, in bfloat16, in one call:
//
//     z   = a + h, a or h                         (per adapter: where the bottleneck reads)
//     d   = round(act(round(W_down z + b_down)))   [r]   at the adapter's own width r
//     out = round((a + h) + W_up d + b_up)         [H]   (W_up, b_up with the adapter's scaling folded in)
//
// for every token t with an adapter (loc >= 0); a token of none gets round(a + h), the decoder's own
// residual add. The products accumulate in float32 over bfloat16 operands, as oneDNN's bfloat16 products
// do, and d is rounded where the PyTorch path rounds it (after the bias, after the activation); the up
// product, its bias and the residual are summed in float32 and rounded once (the PyTorch path rounds the
// sum of the residual and the product, then adds the bias). Only the placements whose output is
// (u + a) + h without layer norms come here; server/adapters/methods/bottleneck.py says when.
//
// `table`: n_ad, then per adapter seven entries: W_down [r, H], W_down's bias [r], W_up transposed [r, H],
// W_up's bias [H] (bfloat16, contiguous), r, where z comes from (0: a + h, 1: a, 2: h), the activation (ACT below). h, a, out: [N, H]
// bfloat16, contiguous. loc [B]: each row's adapter (-1: none); token t is of row t / T.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bf16.h"

namespace {

constexpr int64_t E = 7;       // entries per adapter in `table`
constexpr int64_t CHUNK = 64;  // output columns per work item of the up product
constexpr int64_t L = 16;      // float32 lanes accumulated side by side (one AVX-512 register)

constexpr int64_t RB = 8;      // rows of W_down per work item of the down product

constexpr int64_t SERIAL_WORK = 1 << 21;   // multiply-adds per product below which one thread runs it
constexpr int64_t SERIAL_BYTES = 1 << 18;  // and bytes of weights (bfloat16 W_down and W_up of the adapters used)
constexpr int64_t TB = 4;      // tokens computed together, sharing each load of a weight

// s[u] = sum_i w[i] z[toks[u]][i] for tb <= TB tokens (rows of z [., n]), L partial sums each
inline void dots(const float* w, const float* z, int64_t n, const int64_t* toks, int64_t tb, float* s) {
  float acc[TB][L] = {};
  const float* zr[TB];
  for (int64_t u = 0; u < TB; ++u) zr[u] = z + toks[u < tb ? u : 0] * n;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int64_t u = 0; u < TB; ++u) {
#pragma omp simd
      for (int64_t q = 0; q < L; ++q) acc[u][q] += w[i + q] * zr[u][i + q];
    }
  }
  for (int64_t u = 0; u < tb; ++u) {
    float t = 0.0f;
    for (int64_t k = i; k < n; ++k) t += w[k] * zr[u][k];
    for (int64_t q = 0; q < L; ++q) t += acc[u][q];
    s[u] = t;
  }
}

enum Act : int64_t { RELU = 0, SILU = 1, GELU = 2, GELU_TANH = 3, TANH = 4, LEAKY_RELU = 5, SIGMOID = 6 };

inline float act(int64_t kind, float x) {
  switch (kind) {
    case RELU: return x > 0.0f ? x : 0.0f;
    case SILU: return x / (1.0f + std::exp(-x));
    case GELU: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * x * (1.0f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case TANH: return std::tanh(x);
    case LEAKY_RELU: return x > 0.0f ? x : 0.01f * x;
    default: return 1.0f / (1.0f + std::exp(-x));
  }
}

}  // namespace

extern "C" int bottleneck_rows(int64_t N, int64_t T, int64_t H, const uint16_t* h, const uint16_t* a,
                               uint16_t* out, const int64_t* loc, const int64_t* table, int threads) {
  const int64_t n_ad = table[0];
  int64_t R = 1;
  for (int64_t k = 0; k < n_ad; ++k) R = std::max(R, table[1 + E * k + 4]);
  // the tokens of each adapter (group n_ad: of none): each adapter's weights are read once for all of them
  std::vector<std::vector<int64_t>> group(n_ad + 1);
  for (int64_t t = 0; t < N; ++t) {
    const int64_t k = loc[t / T];
    group[k < 0 ? n_ad : k].push_back(t);
  }
  const int64_t chunks = (H + CHUNK - 1) / CHUNK;
  const int64_t rblocks = (R + RB - 1) / RB;
  std::vector<float> z(static_cast<size_t>(N * H)), d(static_cast<size_t>(N * R));  // inputs, activations
  // a second thread pays for itself only past some work or some bytes of weights to read (this machine: 16
  // tokens at width 36 took 23 us on one thread, 30 on two; at width 288, 157 against 110; one token at
  // width 288, its 0.66 MB of weights read from memory, 1.8x the time on one thread)
  int64_t bytes = 0;
  for (int64_t k = 0; k < n_ad; ++k)
    if (!group[k].empty()) bytes += 4 * H * table[1 + E * k + 4];
  const int team = N * R * H < SERIAL_WORK && bytes < SERIAL_BYTES ? 1 : threads;
#pragma omp parallel num_threads(team)
  {
    // 0. each adapter token's input z, widened
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      const int64_t k = loc[t / T];
      if (k < 0) continue;
      const int64_t zmode = table[1 + E * k + 5];
      float* zt = z.data() + t * H;
      if (zmode == 1) {
        bfloat::widen(a + t * H, zt, H);
      } else if (zmode == 2) {
        bfloat::widen(h + t * H, zt, H);
      } else {
        for (int64_t i = 0; i < H; ++i) zt[i] = bfloat::round(bfloat::to_float(a[t * H + i]) + bfloat::to_float(h[t * H + i]));
      }
    }
    // 1. d = act(W_down z + b_down): work items are (adapter, block of RB rows of W_down)
    std::vector<float> wrow(static_cast<size_t>(H));
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < n_ad * rblocks; ++item) {
      const int64_t k = item / rblocks, j0 = (item % rblocks) * RB;
      const int64_t* e = table + 1 + E * k;
      const int64_t r = e[4];
      if (group[k].empty() || j0 >= r) continue;
      const uint16_t* wd = reinterpret_cast<const uint16_t*>(e[0]);
      const uint16_t* bd = reinterpret_cast<const uint16_t*>(e[1]);
      const int64_t j1 = std::min(r, j0 + RB), nt = static_cast<int64_t>(group[k].size());
      for (int64_t j = j0; j < j1; ++j) {
        bfloat::widen(wd + j * H, wrow.data(), H);
        const float bj = bfloat::to_float(bd[j]);
        for (int64_t n0 = 0; n0 < nt; n0 += TB) {  // TB tokens share each load of the weight row
          const int64_t tb = std::min(TB, nt - n0);
          float s[TB];
          dots(wrow.data(), z.data(), H, group[k].data() + n0, tb, s);
          for (int64_t u = 0; u < tb; ++u)
            d[group[k][n0 + u] * R + j] = bfloat::round(act(e[6], bfloat::round(s[u] + bj)));
        }
      }
    }
    // 2. out = (a + h) + W_up d + b_up: work items are (adapter or none, block of CHUNK columns of out)
    std::vector<float> acc(static_cast<size_t>(N * CHUNK)), wbuf(static_cast<size_t>(R * CHUNK), 0.0f);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < (n_ad + 1) * chunks; ++item) {
      const int64_t k = item / chunks, i0 = (item % chunks) * CHUNK;
      const std::vector<int64_t>& toks = group[k];
      if (toks.empty()) continue;
      const int64_t w = std::min(CHUNK, H - i0);
      if (k == n_ad) {  // rows of none: the decoder's own residual add
        for (const int64_t t : toks)
          for (int64_t i = i0; i < i0 + w; ++i)
            out[t * H + i] = bfloat::from_float(bfloat::to_float(a[t * H + i]) + bfloat::to_float(h[t * H + i]));
        continue;
      }
      const int64_t* e = table + 1 + E * k;
      const int64_t r = e[4];
      const uint16_t* wu = reinterpret_cast<const uint16_t*>(e[2]) + i0;  // [r, H] from column i0
      const int64_t nt = static_cast<int64_t>(toks.size());
      for (int64_t j = 0; j < r; ++j) bfloat::widen(wu + j * H, wbuf.data() + j * CHUNK, w);
      for (int64_t n0 = 0; n0 < nt; n0 += TB) {  // TB tokens' sums held together over the rows of W_up
        const int64_t tb = std::min(TB, nt - n0);
        float sum[TB][CHUNK] = {};
        for (int64_t j = 0; j < r; ++j) {
          const float* wj = wbuf.data() + j * CHUNK;
          for (int64_t u = 0; u < tb; ++u) {
            const float dj = d[toks[n0 + u] * R + j];
#pragma omp simd
            for (int64_t i = 0; i < CHUNK; ++i) sum[u][i] += dj * wj[i];
          }
        }
        for (int64_t u = 0; u < tb; ++u) std::copy(sum[u], sum[u] + w, acc.data() + (n0 + u) * CHUNK);
      }
      const uint16_t* ub = reinterpret_cast<const uint16_t*>(e[3]) + i0;
      for (int64_t n = 0; n < nt; ++n) {  // the residual a + h rounded first, as the decoder has it
        const int64_t t = toks[n];
        const float* an = acc.data() + n * CHUNK;
        for (int64_t i = 0; i < w; ++i) {
          const float res = bfloat::round(bfloat::to_float(a[t * H + i0 + i]) + bfloat::to_float(h[t * H + i0 + i]));
          out[t * H + i0 + i] = bfloat::from_float(res + bfloat::to_float(ub[i]) + an[i]);
        }
      }
    }
  }
  return 0;
}
