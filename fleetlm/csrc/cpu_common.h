// Helpers shared by the compiled CPU ops (csrc/*.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace fleetlm_cpu {

// Any element type the kernels read -> float; bf16 by a shift, which keeps the loops vectorizable.
template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }
template <>
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace fleetlm_cpu
