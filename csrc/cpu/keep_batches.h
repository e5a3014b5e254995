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
#include <limits>

#include "../fastdropout.h"
#include "keep_ranges.h"

namespace fastdropout {

#if defined(__x86_64__) && defined(__GNUC__)
// csrc/cpu/keep_avx2.cpp: eight groups per call, AVX2.
void keep_bytes_avx2(uint8_t* keep, uint64_t seed, uint64_t offset, int64_t group, int64_t count,
                     uint32_t threshold);
// KeepRangeWriter's draws (keep_ranges.h): the group indices of its stream, then its places
// [from, to) drawn and the ranges' keep bytes written from them.
void keep_stream_index_avx2(const cpu::KeepRange* ranges, int64_t count, uint32_t* lo,
                            uint32_t* hi);
void keep_stream_ranges_avx2(const cpu::KeepRange* ranges, int64_t count, const uint32_t* lo,
                             const uint32_t* hi, uint32_t* bits, int64_t from, int64_t to,
                             uint64_t seed, uint64_t offset, uint32_t threshold);
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
    spread_keep_bits(keep + k * kElementsPerPhilox,
                     keep_bits8(rng.seed, rng.offset, static_cast<uint64_t>(group + k), threshold));
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

// The most keep bytes, and ranges, a KeepRangeWriter holds between flushes
// (for_shard_keep_batches' batches, sharded_channels' buffers).
constexpr int64_t kShardBatchElements = 2048;

// Writes the keep bytes of ranges of mask indices where the caller wants them: after put(dst,
// first, count) and the next flush(), dst[k] is the keep byte of mask index first + k, k < count.
// A flush draws the groups of the ranges put since the last one as one stream (keep_ranges.h),
// 8 to a vector whichever ranges they come from, so short ranges (a shard's runs of a few hundred
// elements, a few channels) cost neither a call of their own nor an idle lane, and every group
// is drawn once. Ranges are put in order of dst; a range's bytes are written 8 at a time, so the
// bytes between ranges and the 64 after the last may be overwritten (they must be addressable;
// the callers' ranges follow one another). Between flushes: at most kMaxRanges ranges of
// kShardBatchElements bytes in all.
class KeepRangeWriter {
 public:
  static constexpr int kMaxRanges = 64;
  // Bytes past the last range that a flush may overwrite.
  static constexpr int64_t kSlackBytes = 64;

  KeepRangeWriter(RngPair rng, uint32_t threshold) : rng_(rng), threshold_(threshold) {}

  bool full() const { return size_ == kMaxRanges; }

  void put(uint8_t* dst, int64_t first, int64_t count) {
    if (count <= 0) return;
    const int64_t groups = range_groups(first, count);
    TORCH_INTERNAL_ASSERT(size_ < kMaxRanges && stream_ + groups <= kMaxStream,
                          "KeepRangeWriter: more ranges or bytes than it holds");
    ranges_[size_++] = KeepRange{dst, first, count, stream_};
    stream_ += groups;
  }

  // Draws the ranges put since the last flush, and calls done(begin, end) after those of each
  // part of at least `part` bytes (the last part: what is left), begin .. end - 1 being the
  // bytes of the part's ranges (and any gaps between them). Each part's groups are drawn just
  // before its done(), so that the element loops of a shard, called by done(), alternate with
  // the Philox calls in parts as short as unsharded (kBatchElements).
  template <typename Done>
  void flush(int64_t part, Done&& done) {
    if (size_ == 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
    const bool vectors = use_avx2();
    if (vectors) keep_stream_index_avx2(ranges_, size_, lo_, hi_);
#else
    constexpr bool vectors = false;
#endif
    int64_t drawn = 0;  // stream places drawn so far
    for (int begin = 0; begin < size_;) {
      int end = begin + 1;
      while (end < size_ && bytes_between(begin, end) < part) ++end;
#if defined(__x86_64__) && defined(__GNUC__)
      if (vectors) {
        const KeepRange& last = ranges_[end - 1];
        const int64_t to = ceil_div(last.stream + range_groups(last.first, last.count), 8) * 8;
        keep_stream_ranges_avx2(ranges_ + begin, end - begin, lo_, hi_, bits_, drawn,
                                std::max(drawn, to), rng_.seed, rng_.offset, threshold_);
        drawn = std::max(drawn, to);
      }
#endif
      if (!vectors) write_ranges_scalar(begin, end);
      done(ranges_[begin].dst, ranges_[begin].dst + bytes_between(begin, end));
      begin = end;
    }
    size_ = 0;
    stream_ = 0;
  }

  void flush() {
    flush(std::numeric_limits<int64_t>::max(), [](const uint8_t*, const uint8_t*) {});
  }

 private:
  // Every range touches at most count / 8 + 2 groups.
  static constexpr int64_t kMaxStream = kShardBatchElements / kElementsPerPhilox + 2 * kMaxRanges;

  // From the first byte of range `begin` to the end of range end - 1.
  int64_t bytes_between(int begin, int end) const {
    return ranges_[end - 1].dst + ranges_[end - 1].count - ranges_[begin].dst;
  }

  // The scalar path: the groups of ranges [begin, end), one Philox call each, then their bytes 8
  // at a time, as keep_stream_ranges_avx2.
  void write_ranges_scalar(int begin, int end) {
    for (int i = begin; i < end; ++i) {
      const KeepRange& range = ranges_[i];
      const uint64_t first = range_first_group(range);
      const int64_t groups = range_groups(range.first, range.count);
      for (int64_t g = 0; g < groups; ++g) {
        bits_[range.stream + g] =
            keep_bits8(rng_.seed, rng_.offset, first + static_cast<uint64_t>(g), threshold_);
      }
    }
    for (int i = begin; i < end; ++i) {
      const KeepRange& range = ranges_[i];
      const uint32_t skip = static_cast<uint32_t>(range_skip(range));
      for (int64_t j = 0; j < range.count; j += kElementsPerPhilox) {
        const uint32_t* group = bits_ + range.stream + j / kElementsPerPhilox;
        spread_keep_bits(range.dst + j, range_chunk_bits(group[0], group[1], skip));
      }
    }
  }

  RngPair rng_;
  uint32_t threshold_;
  KeepRange ranges_[kMaxRanges];
  int size_ = 0;
  int64_t stream_ = 0;  // the places the ranges hold
  // The stream: group indices (the AVX2 path) and keep bits, 8 places to spare past the last
  // vector for the writes past a range and the reads of its group j + 1; zeroed, so that no
  // place is read before it is written.
  alignas(32) uint32_t lo_[kMaxStream + 16] = {};
  alignas(32) uint32_t hi_[kMaxStream + 16] = {};
  alignas(32) uint32_t bits_[kMaxStream + 16] = {};
};

// The keep bytes of the local elements [begin, end) of a shard whose runs are shorter than
// kShardBatchElements: body(first, count, keep) with keep[k] the keep byte of local element
// first + k, whose mask index is its global index under `map`; count is at most
// kShardBatchElements (not kBatchElements, as unsharded). A batch is as many whole run pieces as
// fit in kShardBatchElements (and at most KeepRangeWriter::kMaxRanges of them, which is what
// bounds runs shorter than 32), each written in place by one KeepRangeWriter, so that the
// groups of all its runs fill the 8 lanes of their vectors. Its flush draws it and calls the element loops in parts of about kBatchElements
// (KeepRangeWriter::flush), so that they read fresh data while the next part's Philox calls run,
// as unsharded: drawn whole before one element loop, batches of 2048 made bias_dropout_add on
// runs of 256 from multiples of 8 10% slower than unsharded, against 4% (one thread, 2^22 fp32,
// this project's 2-core VM).

template <typename Body>
void for_shard_keep_batches(RngPair rng, uint32_t threshold, const RunMap& map, int64_t begin,
                            int64_t end, Body&& body) {
  uint8_t keep[kShardBatchElements + KeepRangeWriter::kSlackBytes];
  KeepRangeWriter writer(rng, threshold);
  int64_t filled = 0;
  auto finish_batch = [&] {
    writer.flush(kBatchElements, [&](const uint8_t* part, const uint8_t* part_end) {
      body(begin + (part - keep), part_end - part, part);
    });
    begin += filled;
    filled = 0;
  };
  // Pieces come in local order, so each one continues the batch; none is longer than a run.
  for_run_pieces(map, begin, end, [&](int64_t, int64_t global, int64_t count) {
    if (filled + count > kShardBatchElements || writer.full()) finish_batch();
    writer.put(keep + filled, global, count);
    filled += count;
  });
  if (filled > 0) finish_batch();
}

// for_keep_batches over LOCAL elements [begin, end): body(first, count, keep) with keep[k] the
// keep byte of local element first + k, whose mask index is its global index under `shard`
// (null: its own index). Every CPU kernel but the channel ones draws its bits through this, so
// a shard runs the unsharded kernel's loops; count is at most kBatchElements unsharded, and at
// most kShardBatchElements on a shard.
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
