// Device helpers shared by every CUDA kernel family (dropout.cu, channel_dropout.cu,
// bias_dropout_add.cu): where a kernel takes its (seed, offset) from, 16-byte packs of 8
// elements, grid sizing, division by launch constants, and where the mask index of an element
// comes from (its own index, or its global index in a DTensor shard). The mask and the
// arithmetic come from dropout_contract.h.
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
#include <type_traits>

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

// How many of the 8 elements from `base` exist: 8, fewer in the last group, 0 past the end.
// The kernels load first, then resolve the rng state at one call site for all threads (a
// second site on an early-exit path cost the ShardIndex kernels ~20 registers), then leave.
__device__ __forceinline__ int group_count(int64_t base, int64_t numel) {
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kElementsPerPhilox, numel - base)));
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

// Where a kernel's mask indices come from; every kernel family is templated on it, so that a
// DTensor shard runs the unsharded kernel's body. For local elements local .. local + count - 1
// (count <= 8, in one group of 8 local elements):
//   for_pieces(local, count, piece): piece(j, global, n) for pieces whose n elements
//     local + j .. have the consecutive mask-source indices global .. global + n - 1;
//   keep_bits(rng, group, count, threshold): their keep bits (bit j: element 8 group + j).
// ContiguousIndex: an ordinary tensor, global(e) = e: one piece, one Philox call.
struct ContiguousIndex {
  template <typename Piece>
  __device__ __forceinline__ void for_pieces(int64_t local, int count, Piece&& piece) const {
    piece(0, local, count);
  }
  // Bits past count are those of the rest of the group (callers ignore them).
  __device__ __forceinline__ uint32_t keep_bits(RngPair rng, int64_t group, int /*count*/,
                                                uint32_t threshold) const {
    return keep_bits8(rng.seed, rng.offset, group, threshold);
  }
  // keep_bits of a whole group that the caller knows lies in one run of a shard's map.
  __device__ __forceinline__ uint32_t keep_bits_in_run(RngPair rng, int64_t group,
                                                       uint32_t threshold) const {
    return keep_bits8(rng.seed, rng.offset, group, threshold);
  }
};

// Keep bits of the `count` (<= 8) elements whose mask indices are global .. global + count - 1
// (bit j: element j; no bits past count): one Philox call, two where they straddle a group.
__device__ __forceinline__ uint32_t keep_bits_from(RngPair rng, int64_t global, int count,
                                                   uint32_t threshold) {
  const int64_t group = global >> 3;  // global >= 0: / kElementsPerPhilox
  const int shift = static_cast<int>(global & 7);
  uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
  if (shift + count > kElementsPerPhilox) {
    bits |= keep_bits8(rng.seed, rng.offset, group + 1, threshold) << kElementsPerPhilox;
  }
  return (bits >> shift) & ((1u << count) - 1u);
}

// ShardIndex: a DTensor shard (run_map.h), global(e) = start(e / run_length) + e % run_length,
// with every division a GroupDivider. A group of 8 local elements lies in one run when the
// run length is a multiple of 8 (the usual shard); its bits then take one Philox call, or two
// where the run's global start is not a multiple of 8.
struct ShardIndex {
  int64_t run_length;
  int64_t base;
  int levels;
  GroupDivider by_run_length;
  GroupDivider by_count[kMaxRunLevels];
  int64_t strides[kMaxRunLevels];

  explicit ShardIndex(const RunMap& map)
      : run_length(map.run_length),
        base(map.base),
        levels(map.levels),
        by_run_length(map.run_length),
        by_count{GroupDivider(map.counts[0]), GroupDivider(map.counts[1]),
                 GroupDivider(map.counts[2]), GroupDivider(map.counts[3])},
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

  // One division for the first element; later pieces start the next runs (local order).
  // Straight-line for runs of 8 or more (one piece, or two): a general loop over pieces, with
  // the Philox rounds in its body, took these kernels from ~30 registers to 54-72 (half the
  // threads per SM: too few bytes in flight for bf16). Runs shorter than 8 go element by
  // element, one Philox call each.
  template <typename Piece>
  __device__ __forceinline__ void for_pieces(int64_t local, int count, Piece&& piece) const {
    int64_t run, pos;
    by_run_length.divmod(local, &run, &pos);
    const int first = static_cast<int>(std::min<int64_t>(count, run_length - pos));
    piece(0, run_start(run) + pos, first);
    if (first >= count) return;
    if (run_length >= kElementsPerPhilox) {  // the other count - first < 8 lie in the next run
      piece(first, run_start(run + 1), count - first);
      return;
    }
    ++run;
    pos = 0;
#pragma unroll 1
    for (int j = first; j < count; ++j) {
      piece(j, run_start(run) + pos, 1);
      if (++pos == run_length) {
        ++run;
        pos = 0;
      }
    }
  }

  __device__ __forceinline__ uint32_t keep_bits(RngPair rng, int64_t group, int count,
                                                uint32_t threshold) const {
    uint32_t bits = 0;
    for_pieces(group * kElementsPerPhilox, count, [&](int j, int64_t global, int n) {
      bits |= keep_bits_from(rng, global, n, threshold) << j;
    });
    return bits;
  }
  // The whole group in one run (whole rows of a multiple of 8 columns: the fused backward),
  // without the code for pieces it cannot have.
  __device__ __forceinline__ uint32_t keep_bits_in_run(RngPair rng, int64_t group,
                                                       uint32_t threshold) const {
    int64_t run, pos;
    by_run_length.divmod(group * kElementsPerPhilox, &run, &pos);
    return keep_bits_from(rng, run_start(run) + pos, kElementsPerPhilox, threshold);
  }
};

// Calls launch(index) with the pass's mask index: ShardIndex for a shard, else ContiguousIndex.
template <typename Launch>
void with_mask_index(const RunMap* shard, Launch&& launch) {
  if (shard != nullptr) {
    launch(ShardIndex(*shard));
  } else {
    launch(ContiguousIndex{});
  }
}

}  // namespace cuda

// Channel dropout's launcher (channel_dropout.cu); dropout_pass_cuda hands it every pass whose
// channel_numel is not 1.
void channel_dropout_pass_cuda(const DropoutPass& pass);

}  // namespace fastdropout
