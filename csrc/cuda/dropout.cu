// Plain dropout (forward, and backward on the gradient) and the keep mask, on CUDA.
//
// One thread per group of 8 logical elements, the group that one Philox4x32-10 call serves.
// Aligned buffers: the group's 16-byte loads are issued first, then the (seed, offset) and the
// Philox rounds, then 16-byte stores. Misaligned buffers (a view starting mid-vector): each
// warp covers 256 consecutive elements with coalesced scalar accesses, lane l loading elements
// l, l + 32, ..; every lane still computes one Philox call (its own group) and the keep bits
// reach the lanes that need them by warp shuffles, so the arithmetic is the aligned kernel's.
// Full grid, no grid-stride loop. Every kernel here is templated on its mask index
// (kernel_utils.cuh): ContiguousIndex for an ordinary tensor, ShardIndex for a DTensor shard,
// whose elements take the bits of their global indices.
#include "kernel_utils.cuh"

namespace fastdropout {
namespace cuda {
namespace {

template <typename scalar_t, typename Index>
__device__ __forceinline__ void dropout_group_aligned(const scalar_t* in, scalar_t* out,
                                                      int64_t numel, const Index& index,
                                                      const RngSource& src, uint32_t threshold,
                                                      acc_type_t<scalar_t> scale) {
  const int64_t group = thread_group();
  const int64_t base = group * kElementsPerPhilox;
  const int count = group_count(base, numel);
  Group8<scalar_t> values;
  if (count == kElementsPerPhilox) {
    values.load(in + base);
  } else {
    values.load_scalars(in + base, count);
  }
  // Every thread, past the end too (the state is recorded even when the tensor is empty).
  const RngPair rng = resolve_rng(src);
  if (count == 0) return;
  const uint32_t bits = index.keep_bits(rng, group, count, threshold);
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    values[j] = apply_keep((bits >> j) & 1u, values[j], scale);
  }
  if (count == kElementsPerPhilox) {
    values.store(out + base);
  } else {
    values.store_scalars(out + base, count);
  }
}

template <typename scalar_t, typename Index>
__device__ __forceinline__ void dropout_warp_tile(const scalar_t* in, scalar_t* out,
                                                  int64_t numel, const Index& index,
                                                  const RngSource& src, uint32_t threshold,
                                                  acc_type_t<scalar_t> scale) {
  const int64_t group = thread_group();
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  // The warp's first element; the whole warp leaves together (no lane may miss the shuffles).
  const int64_t tile = (group - lane) * kElementsPerPhilox;
  scalar_t values[kElementsPerPhilox];
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    const int64_t e = tile + j * kWarp + lane;
    values[j] = e < numel ? in[e] : scalar_t(0);
  }
  const RngPair rng = resolve_rng(src);
  if (tile >= numel) return;
  // The elements of this lane's own group that exist (none for a lane past the end).
  const int own = static_cast<int>(
      std::max<int64_t>(0, std::min<int64_t>(kElementsPerPhilox, numel - group * kElementsPerPhilox)));
  const uint32_t bits = index.keep_bits(rng, group, own, threshold);
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    // Element tile + 32 j + lane belongs to the group of lane 4 j + lane / 8, at bit lane % 8.
    const uint32_t owner_bits = __shfl_sync(0xffffffffu, bits, j * 4 + (lane >> 3));
    const int64_t e = tile + j * kWarp + lane;
    if (e < numel) out[e] = apply_keep((owner_bits >> (lane & 7)) & 1u, values[j], scale);
  }
}

// Out of place: input and output never overlap, and say so.
template <typename scalar_t, bool kAligned, typename Index>
__global__ void __launch_bounds__(kThreads)
dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t numel,
                    Index index, RngSource src, uint32_t threshold, acc_type_t<scalar_t> scale) {
  if (kAligned) {
    dropout_group_aligned(in, out, numel, index, src, threshold, scale);
  } else {
    dropout_warp_tile(in, out, numel, index, src, threshold, scale);
  }
}

// In place: one buffer, no __restrict__ (each element is read before the same thread writes
// it, which needs no promise of non-aliasing, and gets none).
template <typename scalar_t, bool kAligned, typename Index>
__global__ void __launch_bounds__(kThreads)
dropout_inplace_cuda_kernel(scalar_t* data, int64_t numel, Index index, RngSource src,
                            uint32_t threshold, acc_type_t<scalar_t> scale) {
  if (kAligned) {
    dropout_group_aligned<scalar_t>(data, data, numel, index, src, threshold, scale);
  } else {
    dropout_warp_tile<scalar_t>(data, data, numel, index, src, threshold, scale);
  }
}

// A block-transposed layout (logically (outer, a, b), in memory (outer, b, a): channels_last)
// in one pass. Thread t owns 8 consecutive b of one (outer, a) row, a varying fastest across
// threads so that each of its 8 loads and stores is coalesced across the warp. The 8 logical
// indices are consecutive: one Philox call, two where they straddle a group boundary (b not a
// multiple of 8). kChannelRows: channel dropout with one channel per (outer, a) row.
template <typename scalar_t, bool kChannelRows>
__global__ void __launch_bounds__(kThreads)
dropout_block_transposed_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                     int64_t a_size, int64_t b_size, int64_t threads,
                                     GroupDivider by_a, GroupDivider by_b_groups,
                                     RngSource src, uint32_t threshold,
                                     acc_type_t<scalar_t> scale) {
  const int64_t t = thread_group();
  if (t >= threads) {
    resolve_rng(src);
    return;
  }
  int64_t rest, a, outer, b_group;
  by_a.divmod(t, &rest, &a);
  by_b_groups.divmod(rest, &outer, &b_group);
  const int64_t b0 = b_group * kElementsPerPhilox;
  const int count = static_cast<int>(std::min<int64_t>(kElementsPerPhilox, b_size - b0));
  const int64_t first = (outer * b_size + b0) * a_size + a;  // memory position of element 0
  scalar_t values[kElementsPerPhilox];
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    values[j] = j < count ? in[first + j * a_size] : scalar_t(0);
  }
  const RngPair rng = resolve_rng(src);
  const int64_t row = outer * a_size + a;
  uint32_t bits;
  if (kChannelRows) {
    bits = keep_element(rng.seed, rng.offset, row, threshold) ? 0xFFu : 0u;
  } else {
    bits = keep_bits_from(rng, row * b_size + b0, count, threshold);
  }
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    if (j < count) out[first + j * a_size] = apply_keep((bits >> j) & 1u, values[j], scale);
  }
}

template <typename scalar_t>
void launch_block_transposed(const DropoutPass& pass, const RngSource& src, uint32_t threshold,
                             cudaStream_t stream) {
  const BlockTransposed& layout = pass.transposed;
  const int64_t b_groups = ceil_div(layout.b, kElementsPerPhilox);
  const int64_t threads = layout.outer * b_groups * layout.a;
  TORCH_CHECK(ceil_div(threads, kThreads) < (int64_t{1} << 31), "fastdropout: tensor too large");
  const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
  const GroupDivider by_a(layout.a);
  const GroupDivider by_b_groups(b_groups);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(threads, kThreads))));
  const scalar_t* in = pass.input->const_data_ptr<scalar_t>();
  scalar_t* out = pass.output->mutable_data_ptr<scalar_t>();
  if (pass.channel_numel == 1) {
    dropout_block_transposed_cuda_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        in, out, layout.a, layout.b, threads, by_a, by_b_groups, src, threshold, scale);
  } else {
    TORCH_CHECK(pass.channel_numel == layout.b, "fastdropout: channel_numel must be b here");
    dropout_block_transposed_cuda_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        in, out, layout.a, layout.b, threads, by_a, by_b_groups, src, threshold, scale);
  }
}

// The keep mask as bools; 8 bytes per thread, one 8-byte store where aligned.
__global__ void __launch_bounds__(kThreads)
keep_mask_cuda_kernel(bool* __restrict__ mask, int64_t numel, RngSource src, uint32_t threshold) {
  const int64_t group = thread_group();
  const int64_t base = group * kElementsPerPhilox;
  const RngPair rng = resolve_rng(src);
  if (base >= numel) return;
  const uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
  if (base + kElementsPerPhilox <= numel && reinterpret_cast<uintptr_t>(mask + base) % 8 == 0) {
    uint64_t bytes = 0;
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) bytes |= uint64_t{(bits >> j) & 1u} << (8 * j);
    *reinterpret_cast<uint64_t*>(mask + base) = bytes;
    return;
  }
  for (int j = 0; j < kElementsPerPhilox && base + j < numel; ++j) {
    mask[base + j] = (bits >> j) & 1u;
  }
}

}  // namespace
}  // namespace cuda

void dropout_pass_cuda(const DropoutPass& pass) {
  using namespace cuda;
  const bool transposed = pass.transposed.outer != 0;
  TORCH_CHECK(!transposed || pass.shard == nullptr,
              "fastdropout: a shard's buffers are contiguous");
  if (pass.channel_numel != 1 && !transposed) return channel_dropout_pass_cuda(pass);
  const at::Tensor& in = *pass.input;
  at::Tensor& out = *pass.output;
  const c10::cuda::CUDAGuard guard(in.device());
  const RngSource src = make_rng_source(*pass.rng_state, pass.request, in.device());
  const uint32_t threshold = drop_threshold(pass.p);
  const int64_t numel = in.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (transposed) {
    FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "dropout_block_transposed_cuda", [&] {
      launch_block_transposed<scalar_t>(pass, src, threshold, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const dim3 grid = group_grid(numel);
  FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "dropout_cuda", [&] {
    const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
    const scalar_t* src_ptr = in.const_data_ptr<scalar_t>();
    scalar_t* dst_ptr = out.mutable_data_ptr<scalar_t>();
    const bool aligned = aligned16(src_ptr) && aligned16(dst_ptr);
    const bool in_place = static_cast<const void*>(src_ptr) == static_cast<const void*>(dst_ptr);
    with_mask_index(pass.shard, [&](const auto& index) {
      using Index = std::decay_t<decltype(index)>;
      if (in_place) {
        if (aligned) {
          dropout_inplace_cuda_kernel<scalar_t, true, Index><<<grid, kThreads, 0, stream>>>(
              dst_ptr, numel, index, src, threshold, scale);
        } else {
          dropout_inplace_cuda_kernel<scalar_t, false, Index><<<grid, kThreads, 0, stream>>>(
              dst_ptr, numel, index, src, threshold, scale);
        }
      } else if (aligned) {
        dropout_cuda_kernel<scalar_t, true, Index><<<grid, kThreads, 0, stream>>>(
            src_ptr, dst_ptr, numel, index, src, threshold, scale);
      } else {
        dropout_cuda_kernel<scalar_t, false, Index><<<grid, kThreads, 0, stream>>>(
            src_ptr, dst_ptr, numel, index, src, threshold, scale);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void keep_mask_cuda(at::Tensor& mask, const at::Tensor& rng_state, double p) {
  using namespace cuda;
  const c10::cuda::CUDAGuard guard(mask.device());
  const RngSource src = make_rng_source(rng_state, nullptr, mask.device());
  const int64_t numel = mask.numel();
  if (numel == 0) return;
  keep_mask_cuda_kernel<<<group_grid(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.mutable_data_ptr<bool>(), numel, src, drop_threshold(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastdropout
