// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11).
//
// Written once and compiled both as host C++ (the CPU kernels) and as device code (the CUDA
// kernels), so that a mask computed on either side is the same function of its inputs.
// Checked bit for bit against Random123's known-answer vectors in tests/test_contract.py.
//
// The rounds are a template over the lane type: uint32_t (one Philox instance, what the CUDA
// threads and the scalar CPU paths use) or, on the CPU, a SIMD vector of uint32 lanes (one
// independent instance per lane). A lane type provides PhiloxLane<Lane>::mulhilo; everything
// else is plain integer arithmetic that both kinds of lane support.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline __attribute__((always_inline))
#endif

// The inline namespace keeps the inline functions of a translation unit built for another
// instruction set (csrc/cpu/keep_avx2.cpp defines FD_ISA_NAMESPACE as avx2) apart from the
// baseline ones, so the linker never substitutes one for the other.
#ifndef FD_ISA_NAMESPACE
#define FD_ISA_NAMESPACE baseline
#endif

namespace fastdropout {
inline namespace FD_ISA_NAMESPACE {

// Round multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

template <typename Lane>
struct PhiloxLane;

// One instance: the high and low halves of a 32x32 -> 64-bit product. On the device __umulhi
// is one IMAD.HI.
template <>
struct PhiloxLane<uint32_t> {
  static FD_HOST_DEVICE uint32_t mulhilo(uint32_t m, uint32_t a, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
    *hi = __umulhi(m, a);
    return m * a;
#else
    const uint64_t product = static_cast<uint64_t>(m) * static_cast<uint64_t>(a);
    *hi = static_cast<uint32_t>(product >> 32);
    return static_cast<uint32_t>(product);
#endif
  }
};

template <typename Lane>
struct Philox4x32 {
  Lane w[4];
};

// Ten rounds over counter (c0, c1, c2, c3) under key (k0, k1).
template <typename Lane>
FD_HOST_DEVICE Philox4x32<Lane> philox4x32_10(Lane c0, Lane c1, Lane c2, Lane c3, Lane k0,
                                              Lane k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    Lane hi0, hi1;
    const Lane lo0 = PhiloxLane<Lane>::mulhilo(kPhiloxM0, c0, &hi0);
    const Lane lo1 = PhiloxLane<Lane>::mulhilo(kPhiloxM1, c2, &hi1);
    const Lane n0 = hi1 ^ c1 ^ k0;
    const Lane n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4x32<Lane>{{c0, c1, c2, c3}};
}

}  // namespace FD_ISA_NAMESPACE
}  // namespace fastdropout
