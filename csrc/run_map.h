// The local-to-global index map of a DTensor shard (fastdropout/dtensor.py builds it,
// sharded_ops.cpp checks it). A shard's local tensor, read contiguously, is a sequence of runs
// of `run_length` elements; each run is contiguous in the global tensor's logical row-major
// order too. Every kernel that is handed a map (DropoutPass::shard, BiasDropoutAddForward::shard,
// BiasDropoutAddBackward::shard) gives local element e the keep bit of global(e), so that every
// shard draws exactly its slice of the unsharded tensor's mask.
#pragma once

#include <cstdint>

namespace fastdropout {

// Enough for the outer index space of a shard on a mesh of up to 3 dimensions: after merging
// (fastdropout/dtensor.py), each sharded dimension before the last sharded one gives one level,
// and unsharded leading dimensions one more.
constexpr int kMaxRunLevels = 4;

// Global index of local element e: with r = e / run_length and e % run_length = pos,
// start(r) + pos, where start(r) = base + sum_l digit_l(r) * strides[l] and digit_l are the
// digits of r in the mixed radix counts[0..levels) (the last level varies fastest).
// run_length is always a multiple of the local tensor's last dimension (dtensor.py merges the
// trailing dimensions from the last sharded one on into the run), so a local row never
// straddles two runs.
struct RunMap {
  int64_t run_length = 1;
  int64_t base = 0;
  int levels = 0;
  int64_t counts[kMaxRunLevels] = {};
  int64_t strides[kMaxRunLevels] = {};

};

}  // namespace fastdropout
