// Ranges of keep bytes drawn as one stream of groups (KeepRangeWriter, keep_batches.h): what the
// writer hands to keep_stream_index_avx2 and keep_stream_ranges_avx2 (keep_avx2.cpp), and the
// arithmetic both its paths share. keep_avx2.cpp is compiled for AVX2: its copies of the inline
// functions below live in the inline namespace fastdropout::avx2 (philox.h), apart from the
// baseline ones.
//
// A range wants the keep bytes of mask indices [first, first + count) at dst[0 .. count). Its
// groups (first / 8 on, (first % 8 + count + 7) / 8 of them) take the next places of the
// writer's stream, so the stream holds every group the ranges touch once each, one after the
// other whichever range they come from, and is drawn 8 places to a vector: no lane idles at a
// range's end, and no range needs a call of its own. Byte b of a range lies at bit first % 8 + b
// of its groups' bits laid end to end, so its 8 bytes from 8j on are the 16 bits of its groups j
// and j + 1 shifted right by first % 8 (range_chunk_bits): the bytes are written 8 at a time from
// dst on, with no bytes before dst to save, whatever first % 8 is.
#pragma once

#include <cstdint>
#include <cstring>

#include "../dropout_contract.h"

namespace fastdropout {
namespace cpu {

struct KeepRange {
  uint8_t* dst;
  int64_t first;   // the mask index of dst[0]
  int64_t count;
  int64_t stream;  // the place of its first group in the stream
};

}  // namespace cpu

inline namespace FD_ISA_NAMESPACE {

// first % 8 and first / 8 of a range (first >= 0).
inline int64_t range_skip(const cpu::KeepRange& range) {
  return static_cast<int64_t>(static_cast<uint64_t>(range.first) % kElementsPerPhilox);
}
inline uint64_t range_first_group(const cpu::KeepRange& range) {
  return static_cast<uint64_t>(range.first) / kElementsPerPhilox;
}

// The groups a range touches: its places in the stream.
inline int64_t range_groups(int64_t first, int64_t count) {
  return (static_cast<int64_t>(static_cast<uint64_t>(first) % kElementsPerPhilox) + count +
          kElementsPerPhilox - 1) / kElementsPerPhilox;
}

// keep[j] = bit j of `bits` (8 bits), in one 8-byte store: every byte of bits * 0x0101..01 is
// `bits`, the mask keeps bit j in byte j, and adding 0x7f carries it to the byte's top bit.
inline void spread_keep_bits(uint8_t* keep, uint32_t bits) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t spread = (uint64_t{bits} * 0x0101010101010101ull) & 0x8040201008040201ull;
  spread = ((spread + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
  std::memcpy(keep, &spread, sizeof spread);
#else
  for (int j = 0; j < kElementsPerPhilox; ++j) keep[j] = static_cast<uint8_t>((bits >> j) & 1u);
#endif
}

// The range's 8 bytes from 8j on, as 8 keep bits (bit b: byte 8j + b), from the bits of its
// groups j and j + 1 (bits[0] and bits[1], 8 bits each). Where 8j + 8 > count, the bits past
// count come from whatever bits[1] holds (the next range's group, or none): garbage, in bytes
// past the range, which the next range overwrites.
template <typename Lane>
inline Lane range_chunk_bits(Lane group_j, Lane group_j1, uint32_t skip) {
  return ((group_j | (group_j1 << 8)) >> skip) & 0xFFu;
}

}  // namespace FD_ISA_NAMESPACE
}  // namespace fastdropout
