// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11).
//
// Written once and compiled both as host C++ (the CPU kernels) and as device code (the CUDA
// kernels), so that a mask computed on either side is the same function of its inputs.
// Checked bit for bit against Random123's known-answer vectors in tests/test_philox.py.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fastdropout {

// Round multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4x32 {
  uint32_t w[4];
};

// High and low halves of a 32x32 -> 64-bit product. On the device __umulhi is one IMAD.HI;
// on the host the 64-bit product vectorises (pmuludq) when the caller's loop is batched.
FD_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Ten rounds over counter (c0, c1, c2, c3) under key (k0, k1).
FD_HOST_DEVICE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                        uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

}  // namespace fastdropout
