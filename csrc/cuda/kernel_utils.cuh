// Device helpers shared by every CUDA kernel family (dropout.cu, channel_dropout.cu,
// bias_dropout_add.cu): where a kernel takes its (seed, offset) from, 16-byte packs of 8
// elements, grid sizing. The mask and the arithmetic come from dropout_contract.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
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

  // Loaded as uint4: one 16-byte access per pack.
  __device__ __forceinline__ void load(const scalar_t* p) {
#pragma unroll
    for (int q = 0; q < kPacks; ++q) {
      *reinterpret_cast<uint4*>(&packs[q]) = reinterpret_cast<const uint4*>(p)[q];
    }
  }
  // Elements [0, count) one by one, for a tail or a misaligned buffer; the rest are 0.
  __device__ __forceinline__ void load_scalars(const scalar_t* p, int count) {
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) (*this)[j] = j < count ? p[j] : scalar_t(0);
  }
  // One st.global.v4 per pack, spelled out: in the bias-gradient kernel, where the stored
  // values are also summed, the compiler split a uint4 store into four 4-byte ones.
  __device__ __forceinline__ void store(scalar_t* p) const {
#pragma unroll
    for (int q = 0; q < kPacks; ++q) {
      const uint4 v = *reinterpret_cast<const uint4*>(&packs[q]);
      // No "memory" clobber: no kernel reads back what it stores, and each value stored
      // depends on the loads it must follow, so the compiler may schedule freely around it.
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p + q * pack_t::kSize),
                   "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
    }
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

// Division by a divisor fixed for the whole launch, without a division instruction or
// subroutine: q = (umulhi(n, magic) + n) >> shift, with magic and shift from the host (the
// round-up method ATen's 32-bit IntDivider uses, here over 64 bits). Exact for every dividend
// n < 2^63 (so umulhi(n, magic) + n cannot overflow) and divisor in [1, 2^63].
struct GroupDivider {
  uint64_t magic = 0;
  int shift = 0;
  int64_t divisor = 1;

  explicit GroupDivider(int64_t divisor_) : divisor(divisor_ > 0 ? divisor_ : 1) {
    const auto d = static_cast<uint64_t>(divisor);
    while (shift < 63 && (uint64_t{1} << shift) < d) ++shift;
    const unsigned __int128 one = 1;
    magic = static_cast<uint64_t>(((one << 64) * ((one << shift) - d)) / d + 1);
  }

  // (n / divisor, n % divisor), n >= 0
  __device__ __forceinline__ void divmod(int64_t n, int64_t* q, int64_t* r) const {
    const auto un = static_cast<uint64_t>(n);
    const uint64_t quotient = (__umul64hi(un, magic) + un) >> shift;
    *q = static_cast<int64_t>(quotient);
    *r = n - static_cast<int64_t>(quotient) * divisor;
  }
};

}  // namespace cuda

// Channel dropout's launcher (channel_dropout.cu); dropout_pass_cuda hands it every pass whose
// channel_numel is not 1.
void channel_dropout_pass_cuda(const DropoutPass& pass);

}  // namespace fastdropout
