// Decode attention over a paged KV cache on the CPU: one query position per row, every query head of
// the row, reading each key and value where its page lies (no gathered copy), computing in float32
// whatever the cache's dtype (float32 or bfloat16). Built and loaded by server/kernels/__init__.py.
//
// Layout (one layer): keys and values [kv_heads, n_pages, page_size, head_dim]; tables [B, table_width]
// page ids; row b attends keys first_b .. len_b - 1 (first_b = len_b - window on a sliding-window layer,
// else 0); q [B, heads, head_dim] float32; out [B, heads, head_dim] float32. The heads of a K/V head
// (heads / kv_heads consecutive ones, as grouped-query attention repeats them) share one pass over its
// keys and values: each is loaded once per row and K/V head. Returns nonzero if a table names a page
// outside the pool or is shorter than its row's keys (such a row is not read; its output is zeros).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16.h"

namespace {

// A page's [page_size, head_dim] block as float32: the cache's own memory, or converted into `scratch`.
inline const float* page_block(const void* pool, int bf16, int64_t offset, int64_t n, float* scratch) {
  if (!bf16) return static_cast<const float*>(pool) + offset;
  bfloat::widen(static_cast<const uint16_t*>(pool) + offset, scratch, n);
  return scratch;
}

}  // namespace

extern "C" int paged_decode(const float* q, const void* k_pool, const void* v_pool, int bf16, const int64_t* tables,
                            int64_t table_width, const int64_t* lengths, int64_t B, int64_t heads, int64_t kv_heads,
                            int64_t head_dim, int64_t n_pages, int64_t page_size, int64_t window, float scale,
                            int threads, float* out) {
  const int64_t G = heads / kv_heads, d = head_dim, ps = page_size, block = ps * d;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lengths[b]);
  int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : bad)
  for (int64_t item = 0; item < B * kv_heads; ++item) {
    const int64_t b = item / kv_heads, h = item % kv_heads;
    thread_local std::vector<float> buf;
    const size_t need = static_cast<size_t>(G * longest + block + G * d + G);
    if (buf.size() < need) buf.resize(need);
    float* scores = buf.data();                 // [G, L]
    float* scratch = scores + G * longest;      // one page converted from bfloat16
    float* acc = scratch + block;               // [G, d]
    float* peak = acc + G * d;                  // [G]
    const int64_t len = lengths[b];
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    const int64_t L = len - first;
    const float* qh = q + (b * heads + h * G) * d;
    float* oh = out + (b * heads + h * G) * d;
    std::fill(acc, acc + G * d, 0.0f);
    if (L <= 0) {  // no key: zeros (only padding rows)
      std::fill(oh, oh + G * d, 0.0f);
      continue;
    }
    const int64_t* table = tables + b * table_width;
    const int64_t base = h * n_pages;
    if ((len - 1) / ps >= table_width) {  // the row's table is shorter than its keys
      bad = 1;
      std::fill(oh, oh + G * d, 0.0f);
      continue;
    }
    std::fill(peak, peak + G, -std::numeric_limits<float>::infinity());
    for (int64_t p = first / ps; p <= (len - 1) / ps; ++p) {
      const int64_t page = table[p];
      if (page < 0 || page >= n_pages) { bad = 1; continue; }
      const float* kp = page_block(k_pool, bf16, (base + page) * block, block, scratch);
      const int64_t lo = std::max(first, p * ps), hi = std::min(len, (p + 1) * ps);
      for (int64_t j = lo; j < hi; ++j) {
        const float* kr = kp + (j - p * ps) * d;
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qh + g * d;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qr[i] * kr[i];
          const float s = dot * scale;
          scores[g * L + (j - first)] = s;
          peak[g] = std::max(peak[g], s);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {  // softmax numerators; the denominator divides at the end
      float* sg = scores + g * L;
      const float m = peak[g];
      float total = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        sg[j] = std::exp(sg[j] - m);
        total += sg[j];
      }
      peak[g] = 1.0f / total;
    }
    for (int64_t p = first / ps; p <= (len - 1) / ps; ++p) {
      const int64_t page = table[p];
      if (page < 0 || page >= n_pages) continue;
      const float* vp = page_block(v_pool, bf16, (base + page) * block, block, scratch);
      const int64_t lo = std::max(first, p * ps), hi = std::min(len, (p + 1) * ps);
      for (int64_t j = lo; j < hi; ++j) {
        const float* vr = vp + (j - p * ps) * d;
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * L + (j - first)];
          float* ag = acc + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ag[i] += w * vr[i];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < d; ++i) oh[g * d + i] = acc[g * d + i] * peak[g];
  }
  return bad;
}
