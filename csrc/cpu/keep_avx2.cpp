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

// The stream's group indices (keep_ranges.h): lo[s + g], hi[s + g] = the words of group
// first / 8 + g of the range whose stream place is s, for each of its groups; up to 7 more past
// each range's last are written too (the next range overwrites them), so lo and hi hold at
// least 8 places more than the stream.
void keep_stream_index_avx2(const cpu::KeepRange* ranges, int64_t count, uint32_t* lo,
                            uint32_t* hi) {
  for (int64_t i = 0; i < count; ++i) {
    const cpu::KeepRange& range = ranges[i];
    const uint64_t first = range_first_group(range);
    const int64_t groups = range_groups(range.first, range.count);
    for (int64_t g = 0; g < groups; g += 8) {
      u32x8 l, h;
      consecutive_groups(first + static_cast<uint64_t>(g), &l, &h);
      std::memcpy(lo + range.stream + g, &l, sizeof l);
      std::memcpy(hi + range.stream + g, &h, sizeof h);
    }
  }
}

// Draws stream places [from, to) (from and to multiples of 8) into bits (8 keep bits per place),
// then writes the ranges' keep bytes from the bits of their places, 64 bytes a vector: each
// range's last vector writes up to 63 bytes past it, which the next range overwrites.
void keep_stream_ranges_avx2(const cpu::KeepRange* ranges, int64_t count, const uint32_t* lo,
                             const uint32_t* hi, uint32_t* bits, int64_t from, int64_t to,
                             uint64_t seed, uint64_t offset, uint32_t threshold) {
  for (int64_t k = from; k < to; k += 8) {
    u32x8 l, h;
    std::memcpy(&l, lo + k, sizeof l);
    std::memcpy(&h, hi + k, sizeof h);
    const u32x8 b = keep_bits8_lanes<u32x8>(l, h, seed, offset, threshold);
    std::memcpy(bits + k, &b, sizeof b);
  }
  for (int64_t i = 0; i < count; ++i) {
    const cpu::KeepRange& range = ranges[i];
    const uint32_t skip = static_cast<uint32_t>(range_skip(range));
    if (range.count <= kElementsPerPhilox) {  // a few channels: 8 bytes, not a vector's 64
      const uint32_t* group = bits + range.stream;
      spread_keep_bits(range.dst, range_chunk_bits(group[0], group[1], skip));
      continue;
    }
    for (int64_t j = 0; j < range.count; j += 64) {
      u32x8 group_j, group_j1;
      std::memcpy(&group_j, bits + range.stream + j / 8, sizeof group_j);
      std::memcpy(&group_j1, bits + range.stream + j / 8 + 1, sizeof group_j1);
      spread_keep_bytes(range.dst + j, range_chunk_bits(group_j, group_j1, skip));
    }
  }
}

}  // namespace fastdropout
#endif
