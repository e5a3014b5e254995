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

// keep[j] = bit j of one group's keep bits (the scalar path of the fills below).
inline void spread_keep_bits(uint8_t* keep, uint32_t bits) {
  for (int j = 0; j < kElementsPerPhilox; ++j) keep[j] = static_cast<uint8_t>((bits >> j) & 1u);
}

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
    spread_keep_bits(keep + k * kElementsPerPhilox,
                     keep_bits8(rng.seed, rng.offset, static_cast<uint64_t>(group + k), threshold));
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
    spread_keep_bits(keep + k * kElementsPerPhilox,
                     keep_bits8(rng.seed, rng.offset, static_cast<uint64_t>(groups[k]), threshold));
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

// Writes the keep bytes of ranges of mask indices where the caller wants them: after put(dst,
// first, count) and the next flush(), dst[k] is the keep byte of mask index first + k, k < count.
// A range's whole blocks of 8 groups are drawn straight into place (one 8-lane AVX2 call per
// block); its last groups, which fill no block, are queued and drawn 8 at a time, whichever
// ranges they come from. So short ranges (a shard's runs of a few hundred elements, a few
// channels) cost no scalar Philox call each, and no copy of their bytes.
// The 8 bytes before dst and the 8 after dst + count must be addressable: the block draw writes
// whole groups (up to 7 bytes either side of the range), and put() restores them.
class KeepRangeWriter {
 public:
  KeepRangeWriter(RngPair rng, uint32_t threshold) : rng_(rng), threshold_(threshold) {}

  void put(uint8_t* dst, int64_t first, int64_t count) {
    if (count <= 0) return;
    const auto index = static_cast<uint64_t>(first);  // mask indices are >= 0
    const int64_t skip = static_cast<int64_t>(index % kElementsPerPhilox);
    const auto first_group = static_cast<int64_t>(index / kElementsPerPhilox);
    const int64_t groups = (skip + count + kElementsPerPhilox - 1) / kElementsPerPhilox;
    int64_t direct = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_avx2()) direct = groups & ~int64_t{7};
    if (direct > 0) {
      uint8_t before[kElementsPerPhilox], after[kElementsPerPhilox];
      std::memcpy(before, dst - kElementsPerPhilox, kElementsPerPhilox);
      std::memcpy(after, dst + count, kElementsPerPhilox);
      keep_bytes_avx2(dst - skip, rng_.seed, rng_.offset, first_group, direct, threshold_);
      std::memcpy(dst - kElementsPerPhilox, before, kElementsPerPhilox);
      std::memcpy(dst + count, after, kElementsPerPhilox);
    }
#endif
    for (int64_t g = direct; g < groups; ++g) {
      // the group's bytes inside the range: [lo, hi)
      const int64_t lo = g == 0 ? skip : 0;
      const int64_t hi = std::min<int64_t>(kElementsPerPhilox, skip + count - g * kElementsPerPhilox);
      groups_[queued_] = first_group + g;
      dests_[queued_] = {dst + (g * kElementsPerPhilox - skip) + lo, static_cast<int32_t>(lo),
                         static_cast<int32_t>(hi - lo)};
      if (++queued_ == kQueue) flush();
    }
  }

  int queued() const { return queued_; }

  void flush() {
    if (queued_ == 0) return;
    uint8_t bytes[kQueue * kElementsPerPhilox];
    fill_keep_bytes_gather(bytes, rng_, groups_, queued_, threshold_);
    for (int i = 0; i < queued_; ++i) {
      copy_up_to_8(dests_[i].dst, bytes + i * kElementsPerPhilox + dests_[i].lo, dests_[i].count);
    }
    queued_ = 0;
  }

 private:
  static constexpr int kQueue = 8;  // one 8-lane call
  struct Dest {
    uint8_t* dst;
    int32_t lo, count;  // bytes [lo, lo + count) of the group go to dst
  };
  // 1 to 8 bytes in at most two fixed-size moves each way (a memcpy of a variable count was a
  // library call per queued group).
  static void copy_up_to_8(uint8_t* dst, const uint8_t* src, int32_t n) {
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
    } else {
      *dst = *src;
    }
  }
  RngPair rng_;
  uint32_t threshold_;
  int64_t groups_[kQueue];
  Dest dests_[kQueue];
  int queued_ = 0;
};

// The keep bytes of the local elements [begin, end) of a shard: body(first, count, keep) with
// keep[k] the keep byte of local element first + k, whose mask index is its global index under
// `map`, in batches of local elements whatever the runs: each run's piece of a batch is written
// in place by a KeepRangeWriter, so runs of a few hundred elements still reach the element loops
// in whole batches. A batch ends after kBatchElements, as in for_keep_batches, once nothing is
// left queued (runs whose groups are whole), else at kShardBatchElements: a batch's queued
// groups (one per run that starts off a multiple of 8) are drawn when it ends, and 2048 elements
// fill the 8 lanes from runs of 256 (batches of 512 drew 2 groups in 8 lanes: runs of 256 from
// 8k + 3 were 14-20% slower than the unsharded pass, one thread).
constexpr int64_t kShardBatchElements = 2048;
static_assert(kShardBatchElements % kBatchElements == 0, "batches end at multiples of kBatchElements");

template <typename Body>
void for_shard_keep_batches(RngPair rng, uint32_t threshold, const RunMap& map, int64_t begin,
                            int64_t end, Body&& body) {
  uint8_t storage[kElementsPerPhilox + kShardBatchElements + kElementsPerPhilox];
  uint8_t* const keep = storage + kElementsPerPhilox;
  KeepRangeWriter writer(rng, threshold);
  int64_t batch = begin, filled = 0;
  auto finish_batch = [&] {
    writer.flush();
    body(batch, filled, static_cast<const uint8_t*>(keep));
    batch += filled;
    filled = 0;
  };
  // Pieces come in local order, so each one continues the batch; they are cut at multiples of
  // kBatchElements into it.
  for_run_pieces(map, begin, end, [&](int64_t, int64_t global, int64_t count) {
    while (count > 0) {
      const int64_t n = std::min(count, kBatchElements - filled % kBatchElements);
      writer.put(keep + filled, global, n);
      filled += n;
      global += n;
      count -= n;
      if (filled % kBatchElements == 0 && (writer.queued() == 0 || filled == kShardBatchElements)) {
        finish_batch();
      }
    }
  });
  if (filled > 0) finish_batch();
}

// for_keep_batches over LOCAL elements [begin, end): body(first, count, keep) with keep[k] the
// keep byte of local element first + k, whose mask index is its global index under `shard`
// (null: its own index). Every CPU kernel but the channel ones draws its bits through this, so
// a shard runs the unsharded kernel's loops.
template <typename Body>
void for_local_keep_batches(RngPair rng, uint32_t threshold, const RunMap* shard, int64_t begin,
                            int64_t end, Body&& body) {
  if (shard == nullptr) return for_keep_batches(rng, threshold, begin, end, body);
  if (shard->run_length < kShardBatchElements) {
    return for_shard_keep_batches(rng, threshold, *shard, begin, end, body);
  }
  // Long runs: batches of global indices, run by run, as unsharded (after a run's first batch,
  // every batch starts at a multiple of 8). Written into local batches cut at multiples of 512,
  // runs from unaligned starts drew one group twice per batch and queued one: 5-9% slower than
  // this at runs of 65536 from 8k + 3 (same VM, same run).
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
