// CPU kernel of the sharded pass (DTensor shards): each local element takes the keep bit of its
// global index, so a shard's output is its slice of the unsharded output, bit for bit. The keep
// bits come from the same batches (keep_batches.h) as the unsharded kernels' and each run
// starts its batch at any global index, a multiple of 8 or not; the loops over elements are the
// unsharded kernel's select-and-multiply.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../sharded.h"
#include "keep_batches.h"

namespace fastdropout {
namespace {

using cpu::for_keep_batches;
using cpu::kGrainElements;

// Calls piece(local, global, count) for the pieces of local elements [begin, end) that lie in
// one run each: local elements local .. local + count - 1 have global indices global .. .
template <typename Piece>
void for_run_pieces(const RunMap& map, int64_t begin, int64_t end, Piece&& piece) {
  while (begin < end) {
    const int64_t run = begin / map.run_length;
    const int64_t pos = begin - run * map.run_length;
    const int64_t count = std::min(end - begin, map.run_length - pos);
    piece(begin, map.run_start(run) + pos, count);
    begin += count;
  }
}

template <typename scalar_t>
void sharded_elements(const scalar_t* in, scalar_t* out, int64_t numel, const RunMap& map,
                      RngPair rng, uint32_t threshold, acc_type_t<scalar_t> scale) {
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    for_run_pieces(map, begin, end, [&](int64_t local, int64_t global, int64_t count) {
      for_keep_batches(rng, threshold, global, global + count,
                       [&](int64_t first, int64_t n, const uint8_t* keep) {
                         const scalar_t* s = in + local + (first - global);
                         scalar_t* d = out + local + (first - global);
                         for (int64_t k = 0; k < n; ++k) d[k] = apply_keep(keep[k] != 0, s[k], scale);
                       });
    });
  });
}

// Channel dropout: the keep bit of mask index global / channel_numel.
template <typename scalar_t>
void sharded_channels(const scalar_t* in, scalar_t* out, int64_t numel, const RunMap& map,
                      int64_t channel_numel, RngPair rng, uint32_t threshold,
                      acc_type_t<scalar_t> scale) {
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    for_run_pieces(map, begin, end, [&](int64_t local, int64_t global, int64_t count) {
      const int64_t global_end = global + count;
      const int64_t first_channel = global / channel_numel;
      const int64_t last_channel = (global_end - 1) / channel_numel;
      for_keep_batches(rng, threshold, first_channel, last_channel + 1,
                       [&](int64_t first, int64_t n, const uint8_t* keep) {
                         for (int64_t k = 0; k < n; ++k) {
                           const int64_t g0 = std::max(global, (first + k) * channel_numel);
                           const int64_t g1 = std::min(global_end, (first + k + 1) * channel_numel);
                           for (int64_t g = g0; g < g1; ++g) {
                             const int64_t e = local + (g - global);
                             out[e] = apply_keep(keep[k] != 0, in[e], scale);
                           }
                         }
                       });
    });
  });
}

}  // namespace

void sharded_dropout_pass_cpu(const ShardedPass& sharded) {
  const DropoutPass& pass = sharded.local;
  const at::Tensor& in = *pass.input;
  const RngPair rng = cpu::resolve_rng(*pass.rng_state, pass.request);
  const uint32_t threshold = drop_threshold(pass.p);
  const int64_t numel = in.numel();
  FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "sharded_dropout_cpu", [&] {
    const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = pass.output->mutable_data_ptr<scalar_t>();
    if (pass.channel_numel == 1) {
      sharded_elements(src, dst, numel, sharded.map, rng, threshold, scale);
    } else {
      sharded_channels(src, dst, numel, sharded.map, pass.channel_numel, rng, threshold, scale);
    }
  });
}

}  // namespace fastdropout
