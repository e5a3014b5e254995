// The sharded pass on CUDA (DTensor shards, sharded.h): one thread per 8 consecutive local
// elements of one run. Their global indices are consecutive too, so the thread draws one Philox
// call when they start at a multiple of 8 (runs whose global starts and lengths are multiples
// of 8: the usual shard) and two when they straddle a group boundary. Runs whose length is a
// multiple of 8 on 16-byte aligned buffers of 4- or 8-byte elements move 16-byte packs, others
// go element by element.
// The map's divisions are multiply-high GroupDividers prepared on the host.
#include <type_traits>

#include "../sharded.h"
#include "kernel_utils.cuh"

namespace fastdropout {
namespace cuda {
namespace {

// GroupDivider for divisor, dividends up to `largest`; written for both forms of its
// constructor (with and without the largest dividend) that kernel_utils.cuh has had.
template <typename Divider = GroupDivider>
Divider make_divider(int64_t divisor, int64_t largest) {
  if constexpr (std::is_constructible_v<Divider, int64_t, int64_t>) {
    return Divider(divisor, largest);
  } else {
    return Divider(divisor);
  }
}

struct DeviceRunMap {
  int64_t run_length;
  int64_t base;
  int levels;
  GroupDivider by_threads_per_run;  // thread -> (run, group of 8 within the run)
  GroupDivider by_count[kMaxRunLevels];
  int64_t strides[kMaxRunLevels];

  // threads: the launch's thread count; runs: the number of runs.
  DeviceRunMap(const RunMap& map, int64_t threads, int64_t runs)
      : run_length(map.run_length),
        base(map.base),
        levels(map.levels),
        by_threads_per_run(make_divider(ceil_div(map.run_length, kElementsPerPhilox), threads)),
        by_count{make_divider(map.counts[0], runs), make_divider(map.counts[1], runs),
                 make_divider(map.counts[2], runs), make_divider(map.counts[3], runs)},
        strides{map.strides[0], map.strides[1], map.strides[2], map.strides[3]} {}

  __device__ __forceinline__ int64_t run_start(int64_t run) const {
    int64_t start = base;
#pragma unroll
    for (int l = kMaxRunLevels - 1; l >= 0; --l) {
      if (l < levels) {
        int64_t digit;
        by_count[l].divmod(run, &run, &digit);
        start += digit * strides[l];
      }
    }
    return start;
  }
};

// Keep bits of the `count` elements whose global indices start at `global` (bit j: element j).
__device__ __forceinline__ uint32_t keep_bits_at(RngPair rng, int64_t global, int count,
                                                 uint32_t threshold) {
  const int64_t group = global >> 3;  // global >= 0: / kElementsPerPhilox
  const int shift = static_cast<int>(global & 7);
  uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
  if (shift + count > kElementsPerPhilox) {
    bits |= keep_bits8(rng.seed, rng.offset, group + 1, threshold) << kElementsPerPhilox;
  }
  return bits >> shift;
}

// Channel dropout: element j's bit is the contract's bit for (global + j) / channel_numel;
// one Philox call per distinct channel among the thread's elements (one, mostly).
__device__ __forceinline__ uint32_t channel_keep_bits_at(RngPair rng, int64_t global, int count,
                                                         const GroupDivider& by_channel,
                                                         uint32_t threshold) {
  uint32_t bits = 0;
  int64_t channel, within;
  by_channel.divmod(global, &channel, &within);
  bool keep = keep_element(rng.seed, rng.offset, channel, threshold);
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    if (j < count) {
      if (within == by_channel.divisor) {
        ++channel;
        within = 0;
        keep = keep_element(rng.seed, rng.offset, channel, threshold);
      }
      bits |= static_cast<uint32_t>(keep) << j;
      ++within;
    }
  }
  return bits;
}

template <typename scalar_t, bool kVector, bool kChannels>
__global__ void __launch_bounds__(kThreads)
sharded_dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                            int64_t threads, DeviceRunMap map, GroupDivider by_channel,
                            RngSource src, uint32_t threshold, acc_type_t<scalar_t> scale) {
  const int64_t t = thread_group();
  if (t >= threads) {
    resolve_rng(src);  // records the state even when the tensor is empty
    return;
  }
  int64_t run, k;
  map.by_threads_per_run.divmod(t, &run, &k);
  const int64_t pos = k * kElementsPerPhilox;
  const int64_t local = run * map.run_length + pos;
  const int count = static_cast<int>(std::min<int64_t>(kElementsPerPhilox, map.run_length - pos));
  Group8<scalar_t> values;
  if (kVector) {
    values.load(in + local);
  } else {
    values.load_scalars(in + local, count);
  }
  const int64_t global = map.run_start(run) + pos;
  const RngPair rng = resolve_rng(src);
  const uint32_t bits = kChannels ? channel_keep_bits_at(rng, global, count, by_channel, threshold)
                                  : keep_bits_at(rng, global, count, threshold);
#pragma unroll
  for (int j = 0; j < kElementsPerPhilox; ++j) {
    values[j] = apply_keep((bits >> j) & 1u, values[j], scale);
  }
  if (kVector) {
    values.store(out + local);
  } else {
    values.store_scalars(out + local, count);
  }
}

template <typename scalar_t, bool kChannels>
void launch(const ShardedPass& sharded, const RngSource& src, cudaStream_t stream) {
  const DropoutPass& pass = sharded.local;
  const RunMap& map = sharded.map;
  const int64_t numel = pass.input->numel();
  const int64_t threads =
      numel == 0 ? 0 : (numel / map.run_length) * ceil_div(map.run_length, kElementsPerPhilox);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(threads, kThreads))));
  TORCH_CHECK(ceil_div(threads, kThreads) < (int64_t{1} << 31), "fastdropout: tensor too large");
  const scalar_t* in = pass.input->const_data_ptr<scalar_t>();
  scalar_t* out = pass.output->mutable_data_ptr<scalar_t>();
  // 16-byte packs for 4- and 8-byte types only: for bf16/fp16 nvcc splits this kernel's pack
  // store into four 4-byte stores (tests/test_sass.py flags that), so they take the element path.
  constexpr bool kPackable = sizeof(scalar_t) >= 4;
  const bool vector = kPackable && map.run_length % kElementsPerPhilox == 0 && aligned16(in) &&
                      aligned16(out);
  const int64_t runs = numel == 0 ? 0 : numel / map.run_length;
  const DeviceRunMap device_map(map, threads, runs);
  // The largest global index of the shard: its last run's start plus the run.
  int64_t last_global = map.base + map.run_length - 1;
  for (int l = 0; l < map.levels; ++l) last_global += (map.counts[l] - 1) * map.strides[l];
  const GroupDivider by_channel = make_divider(pass.channel_numel, last_global);
  const uint32_t threshold = drop_threshold(pass.p);
  const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
  if constexpr (kPackable) {
    if (vector) {
      sharded_dropout_cuda_kernel<scalar_t, true, kChannels><<<grid, kThreads, 0, stream>>>(
          in, out, threads, device_map, by_channel, src, threshold, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  sharded_dropout_cuda_kernel<scalar_t, false, kChannels><<<grid, kThreads, 0, stream>>>(
      in, out, threads, device_map, by_channel, src, threshold, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

void sharded_dropout_pass_cuda(const ShardedPass& sharded) {
  using namespace cuda;
  const DropoutPass& pass = sharded.local;
  const at::Tensor& in = *pass.input;
  const c10::cuda::CUDAGuard guard(in.device());
  const RngSource src = make_rng_source(*pass.rng_state, pass.request, in.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "sharded_dropout_cuda", [&] {
    if (pass.channel_numel == 1) {
      launch<scalar_t, false>(sharded, src, stream);
    } else {
      launch<scalar_t, true>(sharded, src, stream);
    }
  });
}

}  // namespace fastdropout
