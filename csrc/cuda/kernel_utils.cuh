// Device helpers shared by every CUDA kernel family (dropout.cu, channel_dropout.cu,
// bias_dropout_add.cu): where a kernel takes its (seed, offset) from, 16-byte packs of 8
// elements, grid sizing. The mask and the arithmetic come from dropout_contract.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>

#include "../fastdropout.h"

namespace fastdropout {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Where a kernel takes its (seed, offset) from. Forward: `philox` (explicit seed, or the CUDA
// generator's state, which under graph capture points at device memory that each replay
// advances) and the pair actually used is written to `record`, the int64[2] tensor handed to
// backward. Backward: read from `saved`, which a captured forward wrote in the same replay.
struct RngSource {
  at::PhiloxCudaState philox;
  const int64_t* saved = nullptr;
  int64_t* record = nullptr;
  bool generator_offset = false;  // generator offsets count 32-bit draws: o = offset / 4
};

// Called by every thread of a kernel (after it has issued its data loads, so that the loads do
// not wait behind this one); block 0's thread 0 records the pair for backward.
__device__ __forceinline__ RngPair resolve_rng(const RngSource& src) {
  if (src.saved != nullptr) {
    return RngPair{static_cast<uint64_t>(__ldg(src.saved)),
                   static_cast<uint64_t>(__ldg(src.saved + 1))};
  }
  const auto unpacked = at::cuda::philox::unpack(src.philox);
  const uint64_t raw_offset = std::get<1>(unpacked);
  const RngPair rng{std::get<0>(unpacked), src.generator_offset ? raw_offset / 4 : raw_offset};
  if (src.record != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 &&
      threadIdx.y == 0) {
    src.record[0] = static_cast<int64_t>(rng.seed);
    src.record[1] = static_cast<int64_t>(rng.offset);
  }
  return rng;
}

inline RngSource make_rng_source(const at::Tensor& rng_state, const RngRequest* request,
                                 const at::Device& device) {
  RngSource src;
  if (request == nullptr) {
    src.saved = rng_state.const_data_ptr<int64_t>();
    return src;
  }
  src.record = rng_state.mutable_data_ptr<int64_t>();
  if (request->seed.has_value()) {
    src.philox = at::PhiloxCudaState(static_cast<uint64_t>(*request->seed),
                                     static_cast<uint64_t>(request->offset));
    return src;
  }
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      request->generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  TORCH_CHECK(gen->device() == device, "fastdropout: generator is on ", gen->device(),
              " but the tensor is on ", device);
  // As PyTorch's own dropout: reserve 4 counters under the generator's lock. The counters of
  // one call, (o, g) for every group g, are exactly those cuRAND's curand_init(seed, g, 4 * o)
  // would use, so no other PyTorch kernel drawing from this generator reuses them.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  src.philox = gen->philox_cuda_state(4);
  src.generator_offset = true;
  return src;
}

// 16-byte vector of scalar_t.
template <typename scalar_t>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// The 8 elements of one Philox group, moved as 16-byte packs (1 for bf16/fp16, 2 for fp32,
// 4 for fp64). The pointers carry no __restrict__ here: the kernels that call these declare
// their own parameters restrict, or not (in place), and that is what the compiler goes by.
template <typename scalar_t>
struct Group8 {
  using pack_t = Pack16<scalar_t>;
  static constexpr int kPacks = kElementsPerPhilox / pack_t::kSize;
  pack_t packs[kPacks];

  __device__ __forceinline__ void load(const scalar_t* p) {
#pragma unroll
    for (int q = 0; q < kPacks; ++q) packs[q] = reinterpret_cast<const pack_t*>(p)[q];
  }
  // Elements [0, count) one by one, for a tail or a misaligned buffer.
  __device__ __forceinline__ void load_scalars(const scalar_t* p, int count) {
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      if (j < count) (*this)[j] = p[j];
    }
  }
  __device__ __forceinline__ void store(scalar_t* p) const {
#pragma unroll
    for (int q = 0; q < kPacks; ++q) reinterpret_cast<pack_t*>(p)[q] = packs[q];
  }
  __device__ __forceinline__ void store_scalars(scalar_t* p, int count) const {
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      if (j < count) p[j] = (*this)[j];
    }
  }
  __device__ __forceinline__ scalar_t& operator[](int j) {
    return packs[j / pack_t::kSize].v[j % pack_t::kSize];
  }
  __device__ __forceinline__ const scalar_t& operator[](int j) const {
    return packs[j / pack_t::kSize].v[j % pack_t::kSize];
  }
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks covering numel elements at 8 per thread; at least one, so that a forward over an
// empty tensor still records its rng state.
inline dim3 group_grid(int64_t numel) {
  const int64_t blocks = ceil_div(ceil_div(numel, kElementsPerPhilox), kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fastdropout: tensor too large");
  return dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
}

// The global thread index of a 1-D launch, as the Philox group this thread owns.
__device__ __forceinline__ int64_t thread_group() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Division by a divisor fixed for the whole launch: a multiply-high and a shift when every
// dividend fits in 32 bits (almost always), a 64-bit division otherwise (more than 2^32
// groups). Chosen on the host, so the branch is uniform.
struct GroupDivider {
  at::cuda::detail::IntDivider<uint32_t> fast;
  int64_t divisor;
  bool use_fast;

  GroupDivider(int64_t divisor_, int64_t largest_dividend)
      : fast(static_cast<uint32_t>(
            divisor_ > 0 && divisor_ < (int64_t{1} << 31) ? divisor_ : 1)),
        divisor(divisor_),
        use_fast(divisor_ > 0 && divisor_ < (int64_t{1} << 31) &&
                 largest_dividend <= std::numeric_limits<uint32_t>::max()) {}

  // (n / divisor, n % divisor)
  __device__ __forceinline__ void divmod(int64_t n, int64_t* q, int64_t* r) const {
    if (use_fast) {
      const auto dm = fast.divmod(static_cast<uint32_t>(n));
      *q = dm.div;
      *r = dm.mod;
    } else {
      *q = n / divisor;
      *r = n - *q * divisor;
    }
  }
};

}  // namespace cuda

// Channel dropout's launcher (channel_dropout.cu); dropout_pass_cuda hands it every pass whose
// channel_numel is not 1.
void channel_dropout_pass_cuda(const DropoutPass& pass);

}  // namespace fastdropout
