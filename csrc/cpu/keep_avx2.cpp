// AVX2 keep bits for the CPU kernels: eight Philox4x32-10 instances side by side in the eight
// 32-bit lanes of a 256-bit vector, through the very same philox4x32_10 and keep_bits8_lanes
// templates as every other kernel. Measured 2.3 to 3x faster than the compiler's own
// vectorisation of the scalar loop on this project's EPYC CI machine (bench/NOTES.md).
//
// The whole translation unit is compiled for AVX2 (the pragma comes before any include), and
// keep_batches.h calls it only after a CPUID check (use_avx2). Its inline functions live in the
// inline namespace fastdropout::avx2, so none of them can stand in for a baseline one at link
// time.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2")
#define FD_ISA_NAMESPACE avx2
#include <immintrin.h>

#include <cstring>

#include "../dropout_contract.h"
#include "keep_ranges.h"

namespace fastdropout {
inline namespace FD_ISA_NAMESPACE {

typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <>
struct PhiloxLane<u32x8> {
  // Products of the even lanes and of the odd lanes (one vpmuludq each), their halves
  // blended back into lanes.
  static inline u32x8 mulhilo(uint32_t m, u32x8 a, u32x8* hi) {
    const __m256i av = reinterpret_cast<__m256i>(a);
    const __m256i mv = _mm256_set1_epi32(static_cast<int>(m));
    const __m256i even = _mm256_mul_epu32(mv, av);
    const __m256i odd = _mm256_mul_epu32(mv, _mm256_srli_epi64(av, 32));
    *hi = reinterpret_cast<u32x8>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
    return reinterpret_cast<u32x8>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
  }
};

}  // namespace FD_ISA_NAMESPACE

namespace {

// keep[8L + j] = bit j of lane L's keep bits: the 8x8 bits spread into 64 bytes.
inline void spread_keep_bytes(uint8_t* keep, u32x8 bits) {
  const __m256i b = reinterpret_cast<__m256i>(bits);
  const __m256i spread_lo = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4,
                                             0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201ll);
  const __m256i ones = _mm256_set1_epi8(1);
  // lanes 0,1 | 4,5 and lanes 2,3 | 6,7 (within each 128-bit half, bytes 0 and 4 hold the
  // keep bits of the half's lanes 0 and 1)
  const __m256i first_pair = _mm256_shuffle_epi8(b, spread_lo);
  const __m256i second_pair = _mm256_shuffle_epi8(_mm256_srli_si256(b, 8), spread_lo);
  const __m256i v01_45 = _mm256_min_epu8(_mm256_and_si256(first_pair, select), ones);
  const __m256i v23_67 = _mm256_min_epu8(_mm256_and_si256(second_pair, select), ones);
  // v01_45 = [lane0 | lane1 | lane4 | lane5], v23_67 = [lane2 | lane3 | lane6 | lane7]
  const __m256i lanes0123 = _mm256_permute2x128_si256(v01_45, v23_67, 0x20);
  const __m256i lanes4567 = _mm256_permute2x128_si256(v01_45, v23_67, 0x31);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep), lanes0123);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 32), lanes4567);
}

// Eight consecutive groups from `first`: the low words are first + lane unless they wrap past
// 2^32.
inline void consecutive_groups(uint64_t first, u32x8* lo, u32x8* hi) {
  const u32x8 lane_index = {0, 1, 2, 3, 4, 5, 6, 7};
  *lo = u32x8{} + static_cast<uint32_t>(first) + lane_index;
  *hi = u32x8{} + static_cast<uint32_t>(first >> 32);
  if (static_cast<uint32_t>(first) > 0xFFFFFFFFu - 7u) {
    for (int lane = 0; lane < 8; ++lane) (*hi)[lane] = static_cast<uint32_t>((first + lane) >> 32);
  }
}

}  // namespace

// keep[8k + j] = keep bit j of group (group + k), for k < count; count a multiple of 8.
void keep_bytes_avx2(uint8_t* keep, uint64_t seed, uint64_t offset, int64_t group,
                     int64_t count, uint32_t threshold) {
  for (int64_t k = 0; k < count; k += 8) {
    u32x8 lo, hi;
    consecutive_groups(static_cast<uint64_t>(group + k), &lo, &hi);
    spread_keep_bytes(keep + 8 * k, keep_bits8_lanes<u32x8>(lo, hi, seed, offset, threshold));
  }
}

// The queued groups of the ranges (keep_ranges.h), in order, 8 to a vector whichever ranges they
// come from: bytes[8q + j] = keep bit j of the q-th. bytes holds their count rounded up to a
// multiple of 8 groups (spare lanes repeat the last group).
void keep_queued_avx2(const cpu::KeepRange* ranges, int64_t count, uint8_t* bytes, uint64_t seed,
                      uint64_t offset, uint32_t threshold) {
  uint64_t groups[8];
  int size = 0;
  auto draw = [&] {
    u32x8 lo, hi;
    for (int lane = 0; lane < 8; ++lane) {
      const uint64_t g = groups[lane < size ? lane : size - 1];
      lo[lane] = static_cast<uint32_t>(g);
      hi[lane] = static_cast<uint32_t>(g >> 32);
    }
    spread_keep_bytes(bytes, keep_bits8_lanes<u32x8>(lo, hi, seed, offset, threshold));
    bytes += 8 * kElementsPerPhilox;
    size = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    for_queued_groups(ranges[i], [&](uint64_t group, uint8_t*, int64_t, int64_t) {
      groups[size++] = group;
      if (size == 8) draw();
    });
  }
  if (size > 0) draw();
}

// The keep bytes of the ranges, in place: their blocks drawn (one call for many ranges: the key
// schedule's broadcasts, ~125 instructions, are made once), their queued groups' bytes copied
// from `queued` (keep_queued_avx2's bytes, from these ranges' first queued group on).
void keep_ranges_avx2(const cpu::KeepRange* ranges, int64_t count, const uint8_t* queued,
                      uint64_t seed, uint64_t offset, uint32_t threshold) {
  for (int64_t i = 0; i < count; ++i) {
    const cpu::KeepRange& range = ranges[i];
    draw_in_place(range, [&](uint8_t* keep, uint64_t group, int64_t blocks) {
      for (int64_t b = 0; b < blocks; ++b) {
        u32x8 lo, hi;
        consecutive_groups(group + 8 * static_cast<uint64_t>(b), &lo, &hi);
        spread_keep_bytes(keep + 64 * b, keep_bits8_lanes<u32x8>(lo, hi, seed, offset, threshold));
      }
    });
    for_queued_groups(range, [&](uint64_t, uint8_t* dst, int64_t lo, int64_t n) {
      copy_up_to_8(dst, queued + lo, n);
      queued += kElementsPerPhilox;
    });
  }
}

}  // namespace fastdropout
#endif
