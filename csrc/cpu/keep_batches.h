// The CPU kernels' way of drawing keep bits: Philox calls in batches of groups into a small
// array of keep bytes (eight groups per call with AVX2), so that the loops over elements become
// plain select-and-multiply loops that vectorise. Used by every CPU kernel (dropout_cpu.cpp:
// plain, channel and fused), for DTensor shards too (for_local_keep_batches), so that every CPU
// kernel draws its bits the same way.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../fastdropout.h"

namespace fastdropout {

#if defined(__x86_64__) && defined(__GNUC__)
// csrc/cpu/keep_avx2.cpp: eight groups per call, AVX2.
void keep_bytes_avx2(uint8_t* keep, uint64_t seed, uint64_t offset, int64_t group, int64_t count,
                     uint32_t threshold);
// The same for any groups: keep[8k + j] = bit j of groups[k], count a multiple of 8.
void keep_bytes_avx2_gather(uint8_t* keep, uint64_t seed, uint64_t offset, const int64_t* groups,
                            int64_t count, uint32_t threshold);
#endif

namespace cpu {

// Philox calls are made in batches of this many groups (8 elements each).
constexpr int64_t kBatchGroups = 64;
constexpr int64_t kBatchElements = kBatchGroups * kElementsPerPhilox;
// Elements per parallel task: large enough to amortise the thread hand-off.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if defined(__x86_64__) && defined(__GNUC__)
// CPUID says AVX2, and FASTDROPOUT_DISABLE_AVX2 is unset (the tests use it to check that both
// paths draw the same masks).
inline bool use_avx2() {
  static const bool enabled = __builtin_cpu_supports("avx2") &&
                              std::getenv("FASTDROPOUT_DISABLE_AVX2") == nullptr;
  return enabled;
}
#endif

// Keep bytes of mask indices [group * 8, group * 8 + count * 8).
inline void fill_keep_bytes(uint8_t* keep, RngPair rng, int64_t group, int64_t count,
                            uint32_t threshold) {
  int64_t k = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    k = count & ~int64_t{7};
    keep_bytes_avx2(keep, rng.seed, rng.offset, group, k, threshold);
    // A remainder of 2 to 7 groups: one more call of 8 lanes (~130 ns here) costs less than
    // that many scalar calls (~80 ns each); for one group the scalar call is cheaper.
    if (count - k >= 2) {
      uint8_t lanes[8 * kElementsPerPhilox];
      keep_bytes_avx2(lanes, rng.seed, rng.offset, group + k, 8, threshold);
      std::memcpy(keep + k * kElementsPerPhilox, lanes, (count - k) * kElementsPerPhilox);
      return;
    }
  }
#endif
  for (; k < count; ++k) {
    const uint32_t bits = keep_bits8(rng.seed, rng.offset, static_cast<uint64_t>(group + k),
                                     threshold);
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      keep[k * kElementsPerPhilox + j] = static_cast<uint8_t>((bits >> j) & 1u);
    }
  }
}

// Keep bytes of the groups listed: keep[8k + j] = bit j of groups[k], for k < count.
inline void fill_keep_bytes_gather(uint8_t* keep, RngPair rng, const int64_t* groups,
                                   int64_t count, uint32_t threshold) {
  int64_t k = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    k = count & ~int64_t{7};
    keep_bytes_avx2_gather(keep, rng.seed, rng.offset, groups, k, threshold);
    if (count - k >= 2) {  // as in fill_keep_bytes: 8 lanes, the spare ones repeat the last group
      int64_t lane_groups[8];
      uint8_t lanes[8 * kElementsPerPhilox];
      for (int lane = 0; lane < 8; ++lane) lane_groups[lane] = groups[std::min(k + lane, count - 1)];
      keep_bytes_avx2_gather(lanes, rng.seed, rng.offset, lane_groups, 8, threshold);
      std::memcpy(keep + k * kElementsPerPhilox, lanes, (count - k) * kElementsPerPhilox);
      return;
    }
  }
#endif
  for (; k < count; ++k) {
    const uint32_t bits = keep_bits8(rng.seed, rng.offset, static_cast<uint64_t>(groups[k]),
                                     threshold);
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      keep[k * kElementsPerPhilox + j] = static_cast<uint8_t>((bits >> j) & 1u);
    }
  }
}

// Calls body(begin, count, keep) for consecutive runs of mask indices covering [begin, end),
// keep[k] being the keep byte of mask index begin + k. Runs never exceed kBatchElements; begin
// need not be a multiple of 8.
template <typename Body>
void for_keep_batches(RngPair rng, uint32_t threshold, int64_t begin, int64_t end, Body&& body) {
  uint8_t keep[kBatchElements + kElementsPerPhilox];
  while (begin < end) {
    const int64_t first_group = begin / kElementsPerPhilox;
    const int64_t skip = begin - first_group * kElementsPerPhilox;
    const int64_t count = std::min(end - begin, kBatchElements - skip);
    fill_keep_bytes(keep, rng, first_group, ceil_div(skip + count, kElementsPerPhilox),
                    threshold);
    body(begin, count, keep + skip);
    begin += count;
  }
}

// Calls piece(local, global, count) for the pieces of local elements [begin, end) that lie in
// one run of a shard's map each: local elements local .. local + count - 1 have global indices
// global .. global + count - 1.
// Divides once, for the first run; the next runs' starts follow by counting up the run's
// mixed-radix digits (runs of a few hundred elements: divisions per run cost ~10%).
template <typename Piece>
void for_run_pieces(const RunMap& map, int64_t begin, int64_t end, Piece&& piece) {
  if (begin >= end) return;
  int64_t run = begin / map.run_length;
  int64_t pos = begin - run * map.run_length;
  int64_t digit[kMaxRunLevels] = {};
  int64_t start = map.base;
  for (int l = map.levels - 1; l >= 0; --l) {
    digit[l] = run % map.counts[l];
    run /= map.counts[l];
    start += digit[l] * map.strides[l];
  }
  for (;;) {
    const int64_t count = std::min(end - begin, map.run_length - pos);
    piece(begin, start + pos, count);
    begin += count;
    if (begin >= end) return;
    pos = 0;
    for (int l = map.levels - 1; l >= 0; --l) {  // the next run: last digit fastest
      start += map.strides[l];
      if (++digit[l] < map.counts[l]) break;
      start -= digit[l] * map.strides[l];
      digit[l] = 0;
    }
  }
}

// for_keep_batches over LOCAL elements [begin, end): body(first, count, keep) with keep[k] the
// keep byte of local element first + k, whose mask index is its global index under `shard`
// (null: its own index). Every CPU kernel but the channel ones draws its bits through this, so
// a shard runs the unsharded kernel's loops.
//
// Short runs (8 to kShortRun elements) not all starting at multiples of 8 are drawn
// kShortRunBatch local elements at a time: the groups of all their pieces in one list, 8 lanes
// at a time. Drawn run by run, each such run has one group more than its 8-lane calls fill, one
// scalar Philox call: runs of 256 from 8k + 3 were 13% slower than the unsharded pass (one
// thread), 7% this way. Runs that start at multiples of 8, and longer runs, are drawn run by run
// (3% and 1-3%; the list costs more than it saves there).
constexpr int64_t kShortRun = 512;
constexpr int64_t kShortRunBatch = 2048;

// Whether every run of the map starts at a multiple of 8 and is a whole number of groups.
inline bool runs_group_aligned(const RunMap& map) {
  bool aligned = map.run_length % kElementsPerPhilox == 0 && map.base % kElementsPerPhilox == 0;
  for (int l = 0; l < map.levels; ++l) aligned = aligned && map.strides[l] % kElementsPerPhilox == 0;
  return aligned;
}

// Keep bytes of short ranges of mask indices, drawn together: each range's groups go into one
// list, drawn 8 lanes at a time, so that ranges of a few groups do not each end in a scalar
// Philox call. Used for short shard runs (element indices) and short channel pieces (channel
// indices). kMaxGroups bounds the groups listed between clear()s.
template <int64_t kMaxGroups>
struct KeepRanges {
  int64_t groups[kMaxGroups];
  uint8_t bytes[kMaxGroups * kElementsPerPhilox];
  int64_t listed = 0;

  // Lists mask indices [first, end); the keep byte of first will be bytes[returned value].
  int64_t add(int64_t first, int64_t end) {
    const int64_t first_group = first / kElementsPerPhilox;
    const int64_t at = listed * kElementsPerPhilox + (first - first_group * kElementsPerPhilox);
    for (int64_t g = first_group; g <= (end - 1) / kElementsPerPhilox; ++g) groups[listed++] = g;
    return at;
  }
  void draw(RngPair rng, uint32_t threshold) {
    fill_keep_bytes_gather(bytes, rng, groups, listed, threshold);
  }
  void clear() { listed = 0; }
};

template <typename Body>
void for_short_run_batches(RngPair rng, uint32_t threshold, const RunMap& map, int64_t begin,
                           int64_t end, Body&& body) {
  // At most kShortRunBatch / 8 + 1 pieces of at most kShortRunBatch / 8 + 2 groups in all.
  constexpr int64_t kMaxPieces = kShortRunBatch / kElementsPerPhilox + 1;
  KeepRanges<kShortRunBatch / kElementsPerPhilox + 2 * kMaxPieces> ranges;
  uint8_t keep[kShortRunBatch];
  struct Piece {
    int64_t local, count, byte;  // the piece's keep bytes: ranges.bytes[byte .. byte + count)
  } pieces[kMaxPieces];
  while (begin < end) {
    const int64_t n = std::min(end - begin, kShortRunBatch);
    int64_t piece_count = 0;
    ranges.clear();
    for_run_pieces(map, begin, begin + n, [&](int64_t local, int64_t global, int64_t count) {
      pieces[piece_count++] = {local, count, ranges.add(global, global + count)};
    });
    ranges.draw(rng, threshold);
    for (int64_t i = 0; i < piece_count; ++i) {
      std::memcpy(keep + (pieces[i].local - begin), ranges.bytes + pieces[i].byte,
                  pieces[i].count);
    }
    body(begin, n, static_cast<const uint8_t*>(keep));
    begin += n;
  }
}

template <typename Body>
void for_local_keep_batches(RngPair rng, uint32_t threshold, const RunMap* shard, int64_t begin,
                            int64_t end, Body&& body) {
  if (shard == nullptr) return for_keep_batches(rng, threshold, begin, end, body);
  if (shard->run_length >= kElementsPerPhilox && shard->run_length < kShortRun &&
      !runs_group_aligned(*shard)) {
    return for_short_run_batches(rng, threshold, *shard, begin, end, body);
  }
  for_run_pieces(*shard, begin, end, [&](int64_t local, int64_t global, int64_t count) {
    for_keep_batches(rng, threshold, global, global + count,
                     [&](int64_t first, int64_t n, const uint8_t* keep) {
                       body(local + (first - global), n, keep);
                     });
  });
}

inline RngPair read_rng_state(const at::Tensor& rng_state) {
  const int64_t* s = rng_state.data_ptr<int64_t>();
  return RngPair{static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1])};
}

inline void write_rng_state(const at::Tensor& rng_state, RngPair rng) {
  int64_t* s = rng_state.data_ptr<int64_t>();
  s[0] = static_cast<int64_t>(rng.seed);
  s[1] = static_cast<int64_t>(rng.offset);
}

// Forward draws and records the state; backward (request == nullptr) replays it.
inline RngPair resolve_rng(const at::Tensor& rng_state, const RngRequest* request) {
  if (request == nullptr) return read_rng_state(rng_state);
  const RngPair rng = acquire_cpu_rng(*request);
  write_rng_state(rng_state, rng);
  return rng;
}

}  // namespace cpu
}  // namespace fastdropout
