// Ranges of keep bytes written in place (KeepRangeWriter, keep_batches.h): what the writer hands
// to keep_queued_avx2 and keep_ranges_avx2 (keep_avx2.cpp), and how a range splits into the draws
// that write it, for the AVX2 and the scalar path alike. keep_avx2.cpp is compiled for AVX2: its
// copies of the inline functions below live in the inline namespace fastdropout::avx2
// (philox.h), apart from the baseline ones.
#pragma once

#include <cstdint>
#include <cstring>

#include "../dropout_contract.h"

namespace fastdropout {
namespace cpu {

// The keep bytes of mask indices [first, first + count) go to dst[0 .. count), and how they are
// drawn (make_keep_range). With 8-lane blocks (the AVX2 path), the range's whole blocks of 8
// groups from its first group on are drawn straight into place, and where 4 to 7 groups are left
// after them, one more block ending at its last group (redrawing a few groups of the block
// before costs less than queueing 4 or more groups and copying their bytes). Its other groups
// (fewer left, all of a range shorter than a block, every group without blocks) are queued:
// drawn 8 to a vector with other ranges' and copied into place.
struct KeepRange {
  uint8_t* dst;
  int64_t first;
  int64_t count;
  int64_t skip;      // first % 8: the range's bytes start at byte `skip` of its first group
  int64_t groups;    // the groups it touches
  int64_t whole;     // its whole blocks' groups
  int64_t in_place;  // the groups drawn in place, [0, in_place): whole, or all of them
};

}  // namespace cpu

inline namespace FD_ISA_NAMESPACE {

inline cpu::KeepRange make_keep_range(uint8_t* dst, int64_t first, int64_t count, bool blocks) {
  cpu::KeepRange range{dst, first, count, 0, 0, 0, 0};
  range.skip = static_cast<int64_t>(static_cast<uint64_t>(first) % kElementsPerPhilox);
  range.groups = (range.skip + count + kElementsPerPhilox - 1) / kElementsPerPhilox;
  range.whole = blocks ? range.groups & ~int64_t{7} : 0;
  range.in_place = range.whole > 0 && range.groups - range.whole >= 4 ? range.groups : range.whole;
  return range;
}

// n bytes, 0 to 8 (none when n <= 0), in at most two fixed-size moves each way (a memcpy of a
// variable count is a library call).
inline void copy_up_to_8(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 4) {
    uint32_t head, tail;
    std::memcpy(&head, src, 4);
    std::memcpy(&tail, src + n - 4, 4);
    std::memcpy(dst, &head, 4);
    std::memcpy(dst + n - 4, &tail, 4);
  } else if (n >= 2) {
    uint16_t head, tail;
    std::memcpy(&head, src, 2);
    std::memcpy(&tail, src + n - 2, 2);
    std::memcpy(dst, &head, 2);
    std::memcpy(dst + n - 2, &tail, 2);
  } else if (n == 1) {
    *dst = *src;
  }
}

// The groups a range draws in place: blocks(keep, group, count) writes the keep bytes of groups
// group .. group + 8 * count - 1 at keep. The bytes this covers outside the range (first % 8
// before dst, and those past its end when its last group is in a block) are saved before and
// put back after; only those: an 8-byte save reaching into the previous range's last block
// store was a store-forwarding stall per range. The 8 bytes before the range and the 8 after it
// must be addressable.
template <typename Blocks>
inline void draw_in_place(const cpu::KeepRange& range, Blocks&& blocks) {
  const int64_t g = range.in_place;
  if (g == 0) return;
  const uint64_t first_group = static_cast<uint64_t>(range.first) / kElementsPerPhilox;
  uint8_t* const keep = range.dst - range.skip;
  const int64_t past = g * kElementsPerPhilox - range.skip - range.count;
  uint8_t before[kElementsPerPhilox], after[kElementsPerPhilox];
  copy_up_to_8(before, keep, range.skip);
  copy_up_to_8(after, range.dst + range.count, past);
  blocks(keep, first_group, range.whole / 8);
  if (g > range.whole) {
    blocks(keep + (g - 8) * kElementsPerPhilox, first_group + static_cast<uint64_t>(g - 8), 1);
  }
  copy_up_to_8(keep, before, range.skip);
  copy_up_to_8(range.dst + range.count, after, past);
}

// The queued groups of a range, in order: group(g, dst, lo, n) for each, bytes lo .. lo + n - 1
// of group g's 8 keep bytes belonging at dst.
template <typename Group>
inline void for_queued_groups(const cpu::KeepRange& range, Group&& group) {
  const uint64_t first_group = static_cast<uint64_t>(range.first) / kElementsPerPhilox;
  for (int64_t g = range.in_place; g < range.groups; ++g) {
    const int64_t lo = g == 0 ? range.skip : 0;
    const int64_t end = range.skip + range.count - g * kElementsPerPhilox;  // > lo
    group(first_group + static_cast<uint64_t>(g),
          range.dst + (g * kElementsPerPhilox - range.skip) + lo, lo,
          (end < kElementsPerPhilox ? end : kElementsPerPhilox) - lo);
  }
}

}  // namespace FD_ISA_NAMESPACE
}  // namespace fastdropout
