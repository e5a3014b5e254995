// The one place that turns (seed, offset, index, p) into keep or drop. Every kernel, CPU and
// CUDA, plain, channel-wise and fused, draws its mask through keep_bits8(); the contract is
// spelled out in README.md ("The mask contract") and pinned by tests/test_contract.py.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.h"

namespace fastdropout {
inline namespace FD_ISA_NAMESPACE {

// One Philox4x32-10 call yields 128 bits: 16 for each of 8 consecutive logical elements.
constexpr int kElementsPerPhilox = 8;

// t = round(p * 65536), ties to even; an element is kept iff its 16 random bits u >= t.
// The effective drop probability is t / 65536 (within 2^-17 of p). Host only: the kernels
// get t precomputed.
inline uint32_t drop_threshold(double p) {
  return static_cast<uint32_t>(std::nearbyint(p * 65536.0));
}

// scale = 1 / (1 - p) in double, rounded to the accumulation type. p = 1 drops everything,
// and 0 (not inf) keeps inf * 0 out of the arithmetic altogether.
template <typename acc_t>
inline acc_t keep_scale(double p) {
  return p >= 1.0 ? acc_t(0) : static_cast<acc_t>(1.0 / (1.0 - p));
}

// Keep bits of the 8 elements of group g (logical indices 8g .. 8g+7): bit j set iff kept.
// Written over the lane type of philox4x32_10: with uint32_t lanes it is one group (every
// kernel); with SIMD lanes, one group per lane (the CPU's batched path), the same arithmetic.
// u >= t is spelled as a carry-free subtraction so that it means the same for scalars and for
// vector lanes: both u and t are below 2^17, so (u - t) >> 31 is 1 exactly when u < t.
template <typename Lane>
FD_HOST_DEVICE Lane keep_bits8_lanes(Lane group_lo, Lane group_hi, uint64_t seed,
                                     uint64_t offset, uint32_t threshold) {
  const Philox4x32<Lane> r = philox4x32_10<Lane>(
      Lane{} + static_cast<uint32_t>(offset), Lane{} + static_cast<uint32_t>(offset >> 32),
      group_lo, group_hi,
      Lane{} + static_cast<uint32_t>(seed), Lane{} + static_cast<uint32_t>(seed >> 32));
  Lane bits = Lane{};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    const Lane u = (r.w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu;
    const Lane kept = ((u - threshold) >> 31) ^ 1u;  // 1 iff u >= threshold
    bits |= kept << j;
  }
  return bits;
}

FD_HOST_DEVICE uint32_t keep_bits8(uint64_t seed, uint64_t offset, uint64_t group,
                                   uint32_t threshold) {
  return keep_bits8_lanes<uint32_t>(static_cast<uint32_t>(group),
                                    static_cast<uint32_t>(group >> 32), seed, offset, threshold);
}

// Keep bit of one logical element (the scalar tails and the channel kernels).
FD_HOST_DEVICE bool keep_element(uint64_t seed, uint64_t offset, uint64_t index,
                                 uint32_t threshold) {
  return (keep_bits8(seed, offset, index / kElementsPerPhilox, threshold) >>
          (index % kElementsPerPhilox)) & 1u;
}

// Float32 accumulation for the 2- and 4-byte types, float64 for double.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// Sums and products rounded on their own: nvcc would otherwise contract a product and a
// following sum into one FMA (one rounding instead of two), and the CUDA results would stop
// matching the CPU ones bit for bit. The CPU side is compiled with -ffp-contract=off.
template <typename T>
FD_HOST_DEVICE T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}
template <typename T>
FD_HOST_DEVICE T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// Every NaN a kernel writes is the dtype's canonical quiet NaN: positive, only the top mantissa
// bit set (fp32 0x7fc00000, fp64 0x7ff8000000000000, fp16 0x7e00, bf16 0x7fc0). Without this
// rule the bits of a kept NaN would depend on the device: x86 keeps a NaN's sign and payload
// through a multiply, NVIDIA GPUs return 0x7fffffff, and the float -> bf16/fp16 conversions
// differ again.
template <typename scalar_t>
struct CanonicalNaN {  // float and double, from their bits
  static FD_HOST_DEVICE scalar_t value() {
    using bits_t = std::conditional_t<sizeof(scalar_t) == 8, uint64_t, uint32_t>;
    const bits_t bits = sizeof(scalar_t) == 8 ? static_cast<bits_t>(0x7ff8000000000000ull)
                                              : static_cast<bits_t>(0x7fc00000u);
    scalar_t value;
    memcpy(&value, &bits, sizeof value);
    return value;
  }
};
template <>
struct CanonicalNaN<c10::Half> {
  static FD_HOST_DEVICE c10::Half value() { return c10::Half(0x7e00, c10::Half::from_bits()); }
};
template <>
struct CanonicalNaN<c10::BFloat16> {
  static FD_HOST_DEVICE c10::BFloat16 value() {
    return c10::BFloat16(0x7fc0, c10::BFloat16::from_bits());
  }
};

// The one rounding of a result from acc_t to the output dtype. A NaN in acc_t is a NaN after
// the conversion and nothing else is (a finite value that overflows becomes inf), so testing
// before the conversion is the same as testing after it.
template <typename scalar_t, typename acc_t>
FD_HOST_DEVICE scalar_t round_result(acc_t v) {
  return v != v ? CanonicalNaN<scalar_t>::value() : static_cast<scalar_t>(v);
}

// A kept element becomes x * scale, the product taken in acc_t and rounded once to scalar_t;
// a dropped one becomes exactly +0 (also where x is inf or NaN).
// The product is computed either way and then selected: branch-free, so that the CPU loops
// vectorise (a conditional multiply is control flow to the vectoriser).
template <typename scalar_t, typename acc_t>
FD_HOST_DEVICE scalar_t apply_keep(bool keep, scalar_t x, acc_t scale) {
  const acc_t kept = mul_rn(static_cast<acc_t>(x), scale);
  return round_result<scalar_t>(keep ? kept : acc_t(0));
}

// The fused transformer path: residual + (keep ? (x + bias) * scale : 0), one rounding at the
// end. Without a bias the sum x + 0 is skipped so that -0 stays -0, as in the unfused code.
template <bool kHasBias, typename scalar_t, typename acc_t>
FD_HOST_DEVICE scalar_t bias_dropout_add_element(bool keep, scalar_t x, acc_t bias,
                                                 scalar_t residual, acc_t scale) {
  const acc_t v = kHasBias ? add_rn(static_cast<acc_t>(x), bias) : static_cast<acc_t>(x);
  const acc_t scaled = mul_rn(v, scale);
  const acc_t dropped = keep ? scaled : acc_t(0);
  return round_result<scalar_t>(add_rn(static_cast<acc_t>(residual), dropped));
}

// The order in which bias_dropout_add's backward sums grad_x over the rows into grad_bias, the
// same on every device so that grad_bias is bit-identical too (acc_t sums, each rounded):
//  1. rows are cut into chunks of kBiasGradChunkRows, each into kBiasGradSlices slices of
//     kBiasGradSliceRows consecutive rows; a slice sums its rows in row order, from +0.
//  2. a chunk's partial is tree_sum over its slices (absent slices are +0).
//  3. while more than one partial is left, each run of kBiasGradFanIn consecutive partials
//     becomes one, their tree_sum (absent entries +0).
// tree_sum(v[0..n)) with n a power of two: for stride = n/2, n/4, .., 1: v[i] += v[i + stride]
// for i < stride; the result is v[0]. The slices and the fan-in give a GPU its parallelism
// (one thread per slice, one block per run) while the order stays a function of the shape only.
constexpr int kBiasGradSliceRows = 8;
constexpr int kBiasGradSlices = 8;
constexpr int kBiasGradChunkRows = kBiasGradSliceRows * kBiasGradSlices;
constexpr int kBiasGradFanIn = 32;

// The (seed, offset) a call used; handed from forward to backward as an int64[2] tensor.
struct RngPair {
  uint64_t seed;
  uint64_t offset;
};

}  // namespace FD_ISA_NAMESPACE
}  // namespace fastdropout
