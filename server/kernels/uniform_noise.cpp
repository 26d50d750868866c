// The uniforms behind seeded sampling (server/engine/sampling.py, `exponential_noise`), computed in one
// pass instead of a dozen passes of int64 tensor ops over [rows, vocabulary]: for row b and token v,
//
//     u = mix32(key_b ^ hash_v) >> 8,    out = (float(u) + 0.5) * 2^-24
//
// with the same 32-bit integer finaliser, in the same integer arithmetic, and the same float32
// roundings, so the values equal the PyTorch path's bit for bit (the tests compare them). Keys and
// token hashes are in [0, 2^32). Built and loaded by server/kernels/__init__.py.
#include <cstdint>

namespace {

constexpr uint64_t M32 = 0xFFFFFFFFull, MUL = 0x45D9F3Bull;

inline uint64_t mix32(uint64_t x) {
  x = (((x >> 16) ^ x) * MUL) & M32;
  x = (((x >> 16) ^ x) * MUL) & M32;
  return (x >> 16) ^ x;
}

}  // namespace

extern "C" int uniform_noise(int64_t B, int64_t V, const int64_t* keys, const int64_t* token_hashes, float* out,
                             int threads) {
  const float scale = 1.0f / 16777216.0f;  // 2^-24, exact
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    const uint64_t key = static_cast<uint64_t>(keys[b]);
    float* o = out + b * V;
    for (int64_t v = 0; v < V; ++v) {
      const uint64_t u = mix32(key ^ static_cast<uint64_t>(token_hashes[v])) >> 8;  // 24 uniform bits
      // (u + 0.5) rounded to float32, then times 2^-24 (exact): what the tensor ops compute; u < 2^24
      // converts exactly, and (a + b) * c is no a * b + c, so no fused multiply-add changes a rounding
      o[v] = (static_cast<float>(static_cast<int32_t>(u)) + 0.5f) * scale;
    }
  }
  return 0;
}
