// Channel dropout on CUDA: element i takes the keep bit of mask index i / channel_numel (the
// contract applied to n * C + c, spread over the channel's elements).
//
// One thread per 8 consecutive elements, as the plain kernel: 16-byte loads and stores where
// the buffers are aligned. channel_numel >= 2, so 8 consecutive elements span at most 5
// channels (4 when they start a channel) and so at most 2 Philox groups of channels: each
// thread makes one Philox call, or two where its channels straddle a group boundary. One division per thread (a multiply-high by
// a precomputed magic number), none per element. On a DTensor shard (ShardIndex) the same per
// piece of the thread's elements that is contiguous in the global tensor: one piece, mostly.
#include "kernel_utils.cuh"

namespace fastdropout {
namespace cuda {
namespace {

// Keep bits of `count` (<= 8) elements whose mask-source indices are global .. global + count - 1
// (bit j: element j; none past count): the channel of each is its index / channel_numel.
__device__ __forceinline__ uint32_t channel_keep_bits(RngPair rng, int64_t global, int count,
                                                      int64_t channel_numel,
                                                      const GroupDivider& channels,
                                                      uint32_t threshold) {
  int64_t channel, within;
  channels.divmod(global, &channel, &within);
  // Keep bits of mask indices first_group * 8 .. first_group * 8 + 15.
  const int64_t first_group = channel / kElementsPerPhilox;
  // The last element lies within + count - 1 < channel_numel + 7 past the first one's channel's
  // start: one channel further at most when channel_numel >= 8, a small 32-bit quotient below.
  const int64_t last_offset = within + count - 1;
  int64_t last_channel = channel;
  if (last_offset >= channel_numel) {
    last_channel += channel_numel >= kElementsPerPhilox
                        ? 1
                        : static_cast<int>(last_offset) / static_cast<int>(channel_numel);
  }
  uint32_t bits = keep_bits8(rng.seed, rng.offset, first_group, threshold);
  if (last_channel / kElementsPerPhilox != first_group) {
    bits |= keep_bits8(rng.seed, rng.offset, first_group + 1, threshold) << kElementsPerPhilox;
  }
  int bit = static_cast<int>(channel - first_group * kElementsPerPhilox);
  uint32_t element_bits = 0;
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    if (j < count) element_bits |= ((bits >> bit) & 1u) << j;
    if (++within == channel_numel) {
      within = 0;
      ++bit;
    }
  }
  return element_bits;
}

template <typename scalar_t, bool kVector, typename Index>
__device__ __forceinline__ void channel_dropout_group(const scalar_t* in, scalar_t* out,
                                                      int64_t numel, int64_t channel_numel,
                                                      const GroupDivider& channels,
                                                      const Index& index, const RngSource& src,
                                                      uint32_t threshold,
                                                      acc_type_t<scalar_t> scale) {
  const int64_t base = thread_group() * kElementsPerPhilox;
  const int count = group_count(base, numel);
  Group8<scalar_t> values;
  if (kVector && count == kElementsPerPhilox) {
    values.load(in + base);
  } else {
    values.load_scalars(in + base, count);
  }
  const RngPair rng = resolve_rng(src);  // every thread: see dropout_group_aligned
  if (count == 0) return;
  uint32_t bits = 0;
  index.for_pieces(base, count, [&](int j, int64_t global, int n) {
    bits |= channel_keep_bits(rng, global, n, channel_numel, channels, threshold) << j;
  });
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    values[j] = apply_keep((bits >> j) & 1u, values[j], scale);
  }
  if (kVector && count == kElementsPerPhilox) {
    values.store(out + base);
  } else {
    values.store_scalars(out + base, count);
  }
}

// Out of place (restrict: the loads may take the read-only path) and in place (not).
template <typename scalar_t, bool kVector, typename Index>
__global__ void __launch_bounds__(kThreads)
channel_dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                            int64_t numel, int64_t channel_numel, GroupDivider channels,
                            Index index, RngSource src, uint32_t threshold,
                            acc_type_t<scalar_t> scale) {
  channel_dropout_group<scalar_t, kVector>(in, out, numel, channel_numel, channels, index, src,
                                           threshold, scale);
}

template <typename scalar_t, bool kVector, typename Index>
__global__ void __launch_bounds__(kThreads)
channel_dropout_inplace_cuda_kernel(scalar_t* data, int64_t numel, int64_t channel_numel,
                                    GroupDivider channels, Index index, RngSource src,
                                    uint32_t threshold, acc_type_t<scalar_t> scale) {
  channel_dropout_group<scalar_t, kVector>(data, data, numel, channel_numel, channels, index,
                                           src, threshold, scale);
}

template <typename scalar_t, bool kVector, typename Index>
void launch_channel_dropout(const scalar_t* in, scalar_t* out, dim3 grid, cudaStream_t stream,
                            int64_t numel, int64_t channel_numel, const GroupDivider& channels,
                            const Index& index, const RngSource& src, uint32_t threshold,
                            acc_type_t<scalar_t> scale) {
  if (static_cast<const void*>(in) == static_cast<const void*>(out)) {
    channel_dropout_inplace_cuda_kernel<scalar_t, kVector, Index><<<grid, kThreads, 0, stream>>>(
        out, numel, channel_numel, channels, index, src, threshold, scale);
  } else {
    channel_dropout_cuda_kernel<scalar_t, kVector, Index><<<grid, kThreads, 0, stream>>>(
        in, out, numel, channel_numel, channels, index, src, threshold, scale);
  }
}

}  // namespace
}  // namespace cuda

void channel_dropout_pass_cuda(const DropoutPass& pass) {
  using namespace cuda;
  const at::Tensor& in = *pass.input;
  at::Tensor& out = *pass.output;
  TORCH_CHECK(pass.channel_numel >= 2, "fastdropout: channel_numel must be >= 2 here");
  const c10::cuda::CUDAGuard guard(in.device());
  const RngSource src = make_rng_source(*pass.rng_state, pass.request, in.device());
  const uint32_t threshold = drop_threshold(pass.p);
  const int64_t numel = in.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid = group_grid(numel);
  const GroupDivider channels(pass.channel_numel);
  FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "channel_dropout_cuda", [&] {
    const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
    const scalar_t* src_ptr = in.const_data_ptr<scalar_t>();
    scalar_t* dst_ptr = out.mutable_data_ptr<scalar_t>();
    const bool aligned = aligned16(src_ptr) && aligned16(dst_ptr);
    with_mask_index(pass.shard, [&](const auto& index) {
      if (aligned) {
        launch_channel_dropout<scalar_t, true>(src_ptr, dst_ptr, grid, stream, numel,
                                               pass.channel_numel, channels, index, src,
                                               threshold, scale);
      } else {
        launch_channel_dropout<scalar_t, false>(src_ptr, dst_ptr, grid, stream, numel,
                                                pass.channel_numel, channels, index, src,
                                                threshold, scale);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastdropout
