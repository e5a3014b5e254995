// Internal interface of the sharded kernels (DTensor shards; fastdropout/dtensor.py builds the
// map, sharded_ops.cpp checks it, cpu/sharded_dropout_cpu.cpp and cuda/sharded_dropout.cu use
// it). A shard's local tensor, read contiguously, is a sequence of runs of `run_length`
// elements; each run is contiguous in the global tensor's logical row-major order too, and the
// kernels give each element the keep bit of its GLOBAL index, so that every shard draws exactly
// its slice of the unsharded tensor's mask.
#pragma once

#include <cstdint>

#include "fastdropout.h"

namespace fastdropout {

// Enough for the outer index space of a shard on a mesh of up to 3 dimensions: after merging
// (fastdropout/dtensor.py), each sharded dimension before the last sharded one gives one level,
// and unsharded leading dimensions one more.
constexpr int kMaxRunLevels = 4;

// Global index of local element e: with r = e / run_length and e % run_length = pos,
// start(r) + pos, where start(r) = base + sum_l digit_l(r) * strides[l] and digit_l are the
// digits of r in the mixed radix counts[0..levels) (the last level varies fastest).
struct RunMap {
  int64_t run_length = 1;
  int64_t base = 0;
  int levels = 0;
  int64_t counts[kMaxRunLevels] = {};
  int64_t strides[kMaxRunLevels] = {};

  // Host form of start(r) (the CUDA kernel divides with precomputed GroupDividers instead).
  int64_t run_start(int64_t run) const {
    int64_t start = base;
    for (int l = levels - 1; l >= 0; --l) {
      const int64_t digit = run % counts[l];
      run /= counts[l];
      start += digit * strides[l];
    }
    return start;
  }
};

// One sharded pass over contiguous local buffers: DropoutPass's pass (contiguous, so
// `transposed` is unused), except that the keep bit of local element e is the contract's bit
// for mask index global(e) / channel_numel.
struct ShardedPass {
  DropoutPass local;
  RunMap map;
};

void sharded_dropout_pass_cpu(const ShardedPass& pass);
#ifdef FASTDROPOUT_WITH_CUDA
void sharded_dropout_pass_cuda(const ShardedPass& pass);
#endif

}  // namespace fastdropout
