// bfloat16 <-> float32 for the kernels here, as bit patterns (bfloat16 is float32's top half), rounding to
// nearest even as torch's .to(torch.bfloat16) does, NaN kept NaN. Included by the kernels' sources
// (server/kernels/__init__.py builds them with this folder on the include path and hashes it with them).
#pragma once
#include <cstdint>
#include <cstring>

namespace bfloat {

inline uint16_t round_bits(uint32_t u) {  // a float32's bits -> the nearest bfloat16's
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
}

inline uint16_t from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return round_bits(u);
}

inline float to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float round(float f) { return to_float(from_float(f)); }  // f rounded to the nearest bfloat16 value

// arrays, in loops that vectorize
inline void widen(const uint16_t* src, float* dst, int64_t n) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(src[i]) << 16;
}

inline void narrow(const float* src, uint16_t* dst, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = round_bits(u[i]);
}

}  // namespace bfloat
