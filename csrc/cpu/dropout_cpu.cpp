// CPU kernels: one pass forward, one pass backward, masks regenerated from (seed, offset).
// Bit-identical to the CUDA kernels: both call keep_bits8() and apply_keep() from
// dropout_contract.h, and this file is compiled with -ffp-contract=off so that no product and
// sum is fused into an FMA that the other side would round differently.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "../fastdropout.h"
#include "keep_batches.h"

namespace fastdropout {

namespace {

using cpu::ceil_div;
using cpu::for_keep_batches;
using cpu::for_local_keep_batches;
using cpu::for_run_pieces;
using cpu::kGrainElements;
using cpu::read_rng_state;
using cpu::resolve_rng;

// for_local_keep_batches, with every run also cut at the ends of rows of `columns` elements:
// body(first, count, keep, column) sees local elements first .. first + count - 1 of one row,
// the first of them in `column`. Loops over a run index bias and partial sums without a wrap,
// so they vectorise.
template <typename Body>
void for_keep_row_runs(RngPair rng, uint32_t threshold, const RunMap* shard, int64_t begin,
                       int64_t end, int64_t columns, Body&& body) {
  for_local_keep_batches(rng, threshold, shard, begin, end,
                         [&](int64_t first, int64_t count, const uint8_t* keep) {
                     int64_t column = first % columns;
                     while (count > 0) {
                       const int64_t n = std::min(count, columns - column);
                       body(first, n, keep, column);
                       first += n;
                       keep += n;
                       count -= n;
                       column = 0;
                     }
                   });
}

// The contract's tree_sum, column-wise: v holds n rows (n a power of two) of `columns` sums;
// for stride = n/2 .. 1, row i += row i + stride for i < stride; the result is row 0.
template <typename acc_t>
void tree_sum_rows(acc_t* v, int n, int64_t columns) {
  for (int stride = n / 2; stride >= 1; stride /= 2) {
    for (int i = 0; i < stride; ++i) {
      acc_t* __restrict__ dst = v + i * columns;
      const acc_t* __restrict__ src = v + (i + stride) * columns;
      for (int64_t c = 0; c < columns; ++c) dst[c] = add_rn(dst[c], src[c]);
    }
  }
}

template <typename scalar_t>
void dropout_elements(const scalar_t* in, scalar_t* out, int64_t numel, const RunMap* shard,
                      RngPair rng, uint32_t threshold, acc_type_t<scalar_t> scale) {
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    for_local_keep_batches(rng, threshold, shard, begin, end,
                           [&](int64_t first, int64_t count, const uint8_t* keep) {
                       const scalar_t* src = in + first;
                       scalar_t* dst = out + first;
                       for (int64_t k = 0; k < count; ++k) {
                         dst[k] = apply_keep(keep[k] != 0, src[k], scale);
                       }
                     });
  });
}

// Channel dropout over the elements with mask-source indices [global, global_end), the first
// of them at local element `local`, for channels [c_begin, c_end): keep[k] is the keep byte of
// channel c_begin + k. Each channel's elements are one loop with the bit hoisted out of it,
// which vectorises (indexing the keep bytes per element inside one loop over all of them ran at
// half the speed).
template <typename scalar_t>
void apply_channel_keep(const scalar_t* in, scalar_t* out, int64_t local, int64_t global,
                        int64_t global_end, int64_t channel_numel, int64_t c_begin,
                        int64_t c_end, const uint8_t* keep, acc_type_t<scalar_t> scale) {
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t g0 = std::max(global, c * channel_numel);
    const int64_t g1 = std::min(global_end, (c + 1) * channel_numel);
    const bool kept = keep[c - c_begin] != 0;
    scalar_t* dst = out + local + (g0 - global);
    const scalar_t* src = in + local + (g0 - global);
    for (int64_t k = 0; k < g1 - g0; ++k) dst[k] = apply_keep(kept, src[k], scale);
  }
}

// Channel dropout: element i takes the keep bit of mask index i / channel_numel; on a shard
// whose runs are whole channels, local channel c takes that of global channel c under
// `channel_shard` (the shard's map in channels, whole_channel_map), so the shard runs this loop.
template <typename scalar_t>
void dropout_channels(const scalar_t* in, scalar_t* out, int64_t numel, int64_t channel_numel,
                      const RunMap* channel_shard, RngPair rng, uint32_t threshold,
                      acc_type_t<scalar_t> scale) {
  const int64_t channels = ceil_div(numel, channel_numel);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / channel_numel);
  at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
    for_local_keep_batches(rng, threshold, channel_shard, begin, end,
                           [&](int64_t first, int64_t count, const uint8_t* keep) {
                             apply_channel_keep(in, out, 0, 0, numel, channel_numel, first,
                                                first + count, keep, scale);
                           });
  });
}

// A shard's map in channels, where every run is whole channels (a tensor sharded on a dimension
// before its channels' own, e.g. Shard(0) or Shard(1) of (N, C, H, W) for dropout2d): the
// runs' lengths, starts and strides divided by channel_numel. False where runs cut channels
// (sharded on a dimension inside the channels: each run lies in one channel).
inline bool whole_channel_map(const RunMap& map, int64_t channel_numel, RunMap* channel_map) {
  bool whole = map.run_length % channel_numel == 0 && map.base % channel_numel == 0;
  for (int l = 0; l < map.levels; ++l) whole = whole && map.strides[l] % channel_numel == 0;
  if (!whole) return false;
  *channel_map = map;
  channel_map->run_length /= channel_numel;
  channel_map->base /= channel_numel;
  for (int l = 0; l < map.levels; ++l) channel_map->strides[l] /= channel_numel;
  return true;
}

// Whether a shard whose runs are whole channels (channel_map: its map in channels) is cheaper
// drawn a span at a time (dropout_channel_spans) than run by run: where runs are a few channels
// with no more channels between them than in them (or 8): a tensor of few channels sharded on
// them, e.g. runs of 4 channels of 8. Placing a run's keep bytes costs ~25 cycles a run
// (KeepRangeWriter, this project's VM), 10-15% of 4 channels of 64 elements, while one Philox
// group draws 8 channels, so drawing the channels between runs too costs at most one group a run.
inline bool draw_channel_spans(const RunMap& channel_map) {
  if (channel_map.levels == 0) return false;
  const int64_t run = channel_map.run_length;
  const int64_t gap = channel_map.strides[channel_map.levels - 1] - run;
  return run < 8 * kElementsPerPhilox && gap <= std::max<int64_t>(run, kElementsPerPhilox);
}

// Channel dropout on such a shard: the keep bytes of every global channel from a run piece's
// first to a later one's last (at most kBatchElements channels) in one fill, and each piece's
// channels applied with its bytes in the span (no per-run copy of keep bytes).
template <typename scalar_t>
void dropout_channel_spans(const scalar_t* in, scalar_t* out, int64_t numel,
                           int64_t channel_numel, const RunMap& channel_map, RngPair rng,
                           uint32_t threshold, acc_type_t<scalar_t> scale) {
  const int64_t channels = ceil_div(numel, channel_numel);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / channel_numel);
  at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t kSpan = cpu::kBatchElements;
    constexpr int kMaxPieces = 64;
    uint8_t keep[kSpan + 2 * kElementsPerPhilox];
    struct Piece {
      int64_t local, global, count;  // channels
    } pieces[kMaxPieces];
    int size = 0;
    int64_t span_end = 0;  // past the last channel of any queued piece
    auto apply = [&] {
      const int64_t first = pieces[0].global;
      const int64_t skip = first % kElementsPerPhilox;
      cpu::fill_keep_bytes(keep, rng, first / kElementsPerPhilox,
                           ceil_div(skip + span_end - first, kElementsPerPhilox), threshold);
      for (int i = 0; i < size; ++i) {
        const Piece& piece = pieces[i];
        apply_channel_keep(in, out, 0, 0, numel, channel_numel, piece.local,
                           piece.local + piece.count, keep + skip + (piece.global - first), scale);
      }
      size = 0;
    };
    // A piece is never longer than a run (< 64 channels, draw_channel_spans). Maps from
    // DTensor shards go up in global order; a hand-made map may not, so the span is checked
    // against every piece's start and end.
    for_run_pieces(channel_map, begin, end, [&](int64_t local, int64_t global, int64_t count) {
      if (size > 0 && (size == kMaxPieces || global < pieces[0].global ||
                       std::max(span_end, global + count) - pieces[0].global > kSpan)) {
        apply();
      }
      if (size == 0) span_end = 0;
      pieces[size++] = Piece{local, global, count};
      span_end = std::max(span_end, global + count);
    });
    if (size > 0) apply();
  });
}

// Channel dropout on a shard whose runs cut channels: local element e takes the keep bit of mask
// index global(e) / channel_numel. The channels of consecutive run pieces are written by one
// KeepRangeWriter into one buffer of keep bytes, and the pieces are applied once it is full:
// a short run's few channels cost no Philox call of their own (drawn piece by piece, each took a
// scalar call, and runs of 256 with channels of 64 were 25-33% slower than the unsharded pass).
template <typename scalar_t>
void sharded_channels(const scalar_t* in, scalar_t* out, int64_t numel, const RunMap& map,
                      int64_t channel_numel, RngPair rng, uint32_t threshold,
                      acc_type_t<scalar_t> scale) {
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    constexpr int64_t kChannels = cpu::kBatchElements;  // keep bytes per buffer
    constexpr int kMaxPieces = 64;
    uint8_t keep[kChannels + cpu::KeepRangeWriter::kSlackBytes];
    cpu::KeepRangeWriter writer(rng, threshold);
    struct Queued {
      int64_t local, global, global_end, c_begin, c_end;
      int64_t at;  // the keep byte of channel c_begin: keep[at]
    } queue[kMaxPieces];
    int queued = 0;
    int64_t filled = 0;
    int64_t last_channel = -1;  // the channel of keep[filled - 1]
    auto apply_queued = [&] {
      writer.flush();
      for (int i = 0; i < queued; ++i) {
        const Queued& q = queue[i];
        apply_channel_keep(in, out, q.local, q.global, q.global_end, channel_numel, q.c_begin,
                           q.c_end, keep + q.at, scale);
      }
      queued = 0;
      filled = 0;
      last_channel = -1;
    };
    for_run_pieces(map, begin, end, [&](int64_t local, int64_t global, int64_t count) {
      const int64_t global_end = global + count;
      const int64_t c_end = (global_end - 1) / channel_numel + 1;
      // A piece with more channels than the buffer holds goes in several parts.
      for (int64_t c = global / channel_numel; c < c_end;) {
        if (queued == kMaxPieces || filled == kChannels) apply_queued();
        // A piece that starts in the channel the last one ended in (runs inside one channel:
        // a tensor sharded on a dimension inside the channels) reuses its keep byte.
        const bool reuse = c == last_channel;
        const int64_t at = reuse ? filled - 1 : filled;
        const int64_t n = std::min(c_end - c, kChannels - at);
        writer.put(keep + filled, reuse ? c + 1 : c, at + n - filled);
        queue[queued++] = {local, global, global_end, c, c + n, at};
        filled = at + n;
        last_channel = c + n - 1;
        c += n;
      }
    });
    if (queued > 0) apply_queued();
  });
}

}  // namespace

RngPair acquire_cpu_rng(const RngRequest& request) {
  if (request.seed.has_value()) {
    return RngPair{static_cast<uint64_t>(*request.seed), static_cast<uint64_t>(request.offset)};
  }
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      request.generator, at::detail::getDefaultCPUGenerator());
  // One 64-bit draw per call, under the generator's lock: concurrent calls never share a seed
  // draw, and torch.manual_seed reproduces the sequence.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return RngPair{gen->random64(), 0};
}

void dropout_pass_cpu(const DropoutPass& pass) {
  TORCH_CHECK(pass.transposed.outer == 0, "fastdropout: the CPU kernels take contiguous buffers");
  const at::Tensor& in = *pass.input;
  at::Tensor& out = *pass.output;
  const RngPair rng = resolve_rng(*pass.rng_state, pass.request);
  const uint32_t threshold = drop_threshold(pass.p);
  const int64_t numel = in.numel();
  FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "dropout_cpu", [&] {
    const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (pass.channel_numel == 1) {
      dropout_elements(src, dst, numel, pass.shard, rng, threshold, scale);
    } else if (pass.shard == nullptr) {
      dropout_channels(src, dst, numel, pass.channel_numel, nullptr, rng, threshold, scale);
    } else if (RunMap channel_map; whole_channel_map(*pass.shard, pass.channel_numel, &channel_map)) {
      if (draw_channel_spans(channel_map)) {
        dropout_channel_spans(src, dst, numel, pass.channel_numel, channel_map, rng, threshold,
                              scale);
      } else {
        dropout_channels(src, dst, numel, pass.channel_numel, &channel_map, rng, threshold, scale);
      }
    } else {
      sharded_channels(src, dst, numel, *pass.shard, pass.channel_numel, rng, threshold, scale);
    }
  });
}

void keep_mask_cpu(at::Tensor& mask, const at::Tensor& rng_state, double p) {
  const RngPair rng = read_rng_state(rng_state);
  const uint32_t threshold = drop_threshold(p);
  bool* dst = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, mask.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
    for_keep_batches(rng, threshold, begin, end,
                     [&](int64_t first, int64_t count, const uint8_t* keep) {
                       for (int64_t k = 0; k < count; ++k) dst[first + k] = keep[k] != 0;
                     });
  });
}

void bias_dropout_add_forward_cpu(const BiasDropoutAddForward& args) {
  const at::Tensor& x = *args.x;
  const bool has_bias = args.bias->defined();
  const int64_t numel = x.numel();
  const int64_t columns = has_bias ? args.bias->numel() : 1;
  const RngPair rng = resolve_rng(*args.rng_state, args.request);
  const uint32_t threshold = drop_threshold(args.p);
  FD_DISPATCH_FLOAT_TYPES(x.scalar_type(),
                                  "bias_dropout_add_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t scale = keep_scale<acc_t>(args.p);
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* rs = args.residual->const_data_ptr<scalar_t>();
    const scalar_t* bs = has_bias ? args.bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = args.output->mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
      if (bs == nullptr) {
        for_local_keep_batches(rng, threshold, args.shard, begin, end,
                               [&](int64_t first, int64_t count, const uint8_t* keep) {
          for (int64_t k = 0; k < count; ++k) {
            const int64_t i = first + k;
            out[i] = bias_dropout_add_element<false>(keep[k] != 0, xs[i], acc_t(0), rs[i], scale);
          }
        });
        return;
      }
      for_keep_row_runs(rng, threshold, args.shard, begin, end, columns,
                        [&](int64_t first, int64_t count, const uint8_t* keep, int64_t column) {
        const scalar_t* b = bs + column;
        for (int64_t k = 0; k < count; ++k) {
          const int64_t i = first + k;
          out[i] = bias_dropout_add_element<true>(keep[k] != 0, xs[i], static_cast<acc_t>(b[k]),
                                                  rs[i], scale);
        }
      });
    });
  });
}

void bias_dropout_add_backward_cpu(const BiasDropoutAddBackward& args) {
  const at::Tensor& grad = *args.grad;
  const int64_t columns = grad.size(-1);
  const int64_t rows = columns == 0 ? 0 : grad.numel() / columns;
  const RngPair rng = read_rng_state(*args.rng_state);
  const uint32_t threshold = drop_threshold(args.p);
  // grad_bias is summed in the order dropout_contract.h fixes (slices of rows, chunks, fan-in
  // levels), the same as the CUDA kernels: bit-identical on both devices, whatever the thread
  // count.
  const int64_t chunks = ceil_div(rows, kBiasGradChunkRows);
  FD_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "bias_dropout_add_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t scale = keep_scale<acc_t>(args.p);
    const scalar_t* gs = grad.const_data_ptr<scalar_t>();
    scalar_t* gx = args.grad_x->mutable_data_ptr<scalar_t>();
    std::vector<acc_t> partials(static_cast<size_t>(std::max<int64_t>(chunks, 1) * columns),
                                acc_t(0));
    // Tasks: one chunk's rows over one block of kColumnBlock columns (each column's sum is on
    // its own, so any block of columns may go to any thread). Rows of up to kColumnBlock columns
    // are one block: the chunk's rows are read as one range. Wider rows are cut into blocks, so
    // the slice sums stay in cache and a few very wide rows still use every thread (2 rows of
    // 2^21 columns took 200 ms on one thread, against 9 ms for the same elements as 64 rows).
    constexpr int64_t kColumnBlock = 4096;
    const int64_t column_blocks = ceil_div(columns, kColumnBlock);
    const int64_t block_width = std::min(columns, kColumnBlock);
    // At least kGrainElements per task: a small gradient stays on the calling thread (waking
    // the OpenMP team for a few thousand elements cost milliseconds on a loaded machine).
    const int64_t task_grain = std::max<int64_t>(
        1, kGrainElements / (kBiasGradChunkRows * std::max<int64_t>(block_width, 1)));
    at::parallel_for(0, chunks * column_blocks, task_grain, [&](int64_t task_begin, int64_t task_end) {
      std::vector<acc_t> slices(static_cast<size_t>(kBiasGradSlices * block_width));
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t chunk = task / column_blocks;
        const int64_t c0 = (task % column_blocks) * kColumnBlock;
        const int64_t width = std::min(kColumnBlock, columns - c0);
        std::fill(slices.begin(), slices.begin() + kBiasGradSlices * width, acc_t(0));
        const int64_t first_row = chunk * kBiasGradChunkRows;
        const int64_t end_row = std::min(rows, first_row + kBiasGradChunkRows);
        // Runs never cross a row end, so each run adds into the sums of one slice, in row order.
        auto add_rows = [&](int64_t e0, int64_t e1) {
          for_keep_row_runs(rng, threshold, args.shard, e0, e1, columns,
                            [&](int64_t first, int64_t count, const uint8_t* keep, int64_t column) {
            const int64_t slice = (first / columns - first_row) / kBiasGradSliceRows;
            acc_t* __restrict__ sum = slices.data() + slice * width + (column - c0);
            for (int64_t k = 0; k < count; ++k) {
              const scalar_t g = apply_keep(keep[k] != 0, gs[first + k], scale);
              gx[first + k] = g;
              sum[k] = add_rn(sum[k], static_cast<acc_t>(g));
            }
          });
        };
        if (column_blocks == 1) {
          add_rows(first_row * columns, end_row * columns);
        } else {
          for (int64_t row = first_row; row < end_row; ++row) {
            add_rows(row * columns + c0, row * columns + c0 + width);
          }
        }
        tree_sum_rows(slices.data(), kBiasGradSlices, width);
        std::copy(slices.begin(), slices.begin() + width, partials.begin() + chunk * columns + c0);
      }
    });
    // Fan-in levels: every run of kBiasGradFanIn partials becomes one (written over the first
    // partial rows, which have been read by then), until one is left; a block of columns at a
    // time, so the scratch stays kBiasGradFanIn x kColumnBlock (it was kBiasGradFanIn rows of
    // every column, zeroed even for one chunk: 512 MiB and 0.4 s for a single row of 2^22).
    std::vector<acc_t> run;
    for (int64_t n = chunks; n > 1; n = ceil_div(n, kBiasGradFanIn)) {
      run.resize(static_cast<size_t>(kBiasGradFanIn * block_width));
      for (int64_t out = 0; out < ceil_div(n, kBiasGradFanIn); ++out) {
        const int64_t first = out * kBiasGradFanIn;
        const int64_t present = std::min<int64_t>(kBiasGradFanIn, n - first);
        for (int64_t c0 = 0; c0 < columns; c0 += kColumnBlock) {
          const int64_t width = std::min(kColumnBlock, columns - c0);
          for (int64_t i = 0; i < kBiasGradFanIn; ++i) {
            acc_t* row = run.data() + i * width;
            if (i < present) {
              const auto src = partials.begin() + (first + i) * columns + c0;
              std::copy(src, src + width, row);
            } else {
              std::fill(row, row + width, acc_t(0));
            }
          }
          tree_sum_rows(run.data(), kBiasGradFanIn, width);
          std::copy(run.begin(), run.begin() + width, partials.begin() + out * columns + c0);
        }
      }
    }
    scalar_t* gb = args.grad_bias->mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < columns; ++c) gb[c] = round_result<scalar_t>(partials[c]);
  });
}

}  // namespace fastdropout
