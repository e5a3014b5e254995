// Channel dropout on CUDA: element i takes the keep bit of mask index i / channel_numel (the
// contract applied to n * C + c, spread over the channel's elements).
//
// One thread per 8 consecutive elements, as the plain kernel: 16-byte loads and stores where
// the buffers are aligned. channel_numel >= 2, so 8 consecutive elements span at most 4
// channels and so at most 2 Philox groups of channels: each thread makes one Philox call, or
// two where its channels straddle a group boundary. One division per thread (a multiply-high by
// a precomputed magic number), none per element.
#include "kernel_utils.cuh"

namespace fastdropout {
namespace cuda {
namespace {

template <typename scalar_t, bool kVector>
__device__ __forceinline__ void channel_dropout_group(const scalar_t* in, scalar_t* out,
                                                      int64_t numel, int64_t channel_numel,
                                                      const GroupDivider& channels,
                                                      const RngSource& src, uint32_t threshold,
                                                      acc_type_t<scalar_t> scale) {
  const int64_t base = thread_group() * kElementsPerPhilox;
  if (base >= numel) {
    resolve_rng(src);
    return;
  }
  const int count = static_cast<int>(std::min<int64_t>(kElementsPerPhilox, numel - base));
  Group8<scalar_t> values;
  if (kVector && count == kElementsPerPhilox) {
    values.load(in + base);
  } else {
    values.load_scalars(in + base, count);
  }
  const RngPair rng = resolve_rng(src);
  int64_t channel, within;
  channels.divmod(base, &channel, &within);
  // Keep bits of mask indices first_group * 8 .. first_group * 8 + 15.
  const int64_t first_group = channel / kElementsPerPhilox;
  // The thread's last element lies within + count - 1 < channel_numel + 7 past its channel's
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
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    values[j] = apply_keep((bits >> bit) & 1u, values[j], scale);
    if (++within == channel_numel) {
      within = 0;
      ++bit;
    }
  }
  if (kVector && count == kElementsPerPhilox) {
    values.store(out + base);
  } else {
    values.store_scalars(out + base, count);
  }
}

// Out of place (restrict: the loads may take the read-only path) and in place (not).
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
channel_dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                            int64_t numel, int64_t channel_numel, GroupDivider channels,
                            RngSource src, uint32_t threshold, acc_type_t<scalar_t> scale) {
  channel_dropout_group<scalar_t, kVector>(in, out, numel, channel_numel, channels, src,
                                           threshold, scale);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
channel_dropout_inplace_cuda_kernel(scalar_t* data, int64_t numel, int64_t channel_numel,
                                    GroupDivider channels, RngSource src, uint32_t threshold,
                                    acc_type_t<scalar_t> scale) {
  channel_dropout_group<scalar_t, kVector>(data, data, numel, channel_numel, channels, src,
                                           threshold, scale);
}

template <typename scalar_t, bool kVector>
void launch_channel_dropout(const scalar_t* in, scalar_t* out, dim3 grid, cudaStream_t stream,
                            int64_t numel, int64_t channel_numel, const GroupDivider& channels,
                            const RngSource& src, uint32_t threshold,
                            acc_type_t<scalar_t> scale) {
  if (static_cast<const void*>(in) == static_cast<const void*>(out)) {
    channel_dropout_inplace_cuda_kernel<scalar_t, kVector><<<grid, kThreads, 0, stream>>>(
        out, numel, channel_numel, channels, src, threshold, scale);
  } else {
    channel_dropout_cuda_kernel<scalar_t, kVector><<<grid, kThreads, 0, stream>>>(
        in, out, numel, channel_numel, channels, src, threshold, scale);
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
    if (aligned16(src_ptr) && aligned16(dst_ptr)) {
      launch_channel_dropout<scalar_t, true>(src_ptr, dst_ptr, grid, stream, numel,
                                             pass.channel_numel, channels, src, threshold, scale);
    } else {
      launch_channel_dropout<scalar_t, false>(src_ptr, dst_ptr, grid, stream, numel,
                                              pass.channel_numel, channels, src, threshold, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastdropout
