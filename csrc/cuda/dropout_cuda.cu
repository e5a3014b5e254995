// CUDA kernels. One thread per group of 8 logical elements, the group that one Philox4x32-10
// call serves: the loads of a group are issued before its Philox rounds so that memory and
// arithmetic overlap, and accesses are 16 bytes wide where the buffers allow it (8 bf16/fp16
// elements: one 16-byte load; 8 fp32: two; 8 fp64: four). Full grid, no grid-stride loop:
// reported faster on an H200 for this memory-bound pass than a capped grid (bench/NOTES.md).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <mutex>

#include "../fastdropout.h"

namespace fastdropout {
namespace {

constexpr int kThreads = 256;

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

__device__ __forceinline__ RngPair resolve_rng(const RngSource& src) {
  if (src.saved != nullptr) {
    return RngPair{static_cast<uint64_t>(src.saved[0]), static_cast<uint64_t>(src.saved[1])};
  }
  const auto unpacked = at::cuda::philox::unpack(src.philox);
  const uint64_t raw_offset = std::get<1>(unpacked);
  const RngPair rng{std::get<0>(unpacked), src.generator_offset ? raw_offset / 4 : raw_offset};
  if (src.record != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    src.record[0] = static_cast<int64_t>(rng.seed);
    src.record[1] = static_cast<int64_t>(rng.offset);
  }
  return rng;
}

RngSource make_rng_source(const at::Tensor& rng_state, const RngRequest* request,
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

// The 8 elements of one group, loaded as 16-byte packs.
template <typename scalar_t>
struct Group8 {
  using pack_t = Pack16<scalar_t>;
  static constexpr int kPacks = kElementsPerPhilox / pack_t::kSize;
  pack_t packs[kPacks];

  __device__ __forceinline__ void load(const scalar_t* __restrict__ p) {
#pragma unroll
    for (int q = 0; q < kPacks; ++q) packs[q] = reinterpret_cast<const pack_t*>(p)[q];
  }
  __device__ __forceinline__ void store(scalar_t* __restrict__ p) const {
#pragma unroll
    for (int q = 0; q < kPacks; ++q) reinterpret_cast<pack_t*>(p)[q] = packs[q];
  }
  __device__ __forceinline__ scalar_t& operator[](int j) {
    return packs[j / pack_t::kSize].v[j % pack_t::kSize];
  }
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks covering numel elements at 8 per thread; at least one, so that a forward over an
// empty tensor still records its rng state.
dim3 group_grid(int64_t numel) {
  const int64_t blocks = ceil_div(ceil_div(numel, kElementsPerPhilox), kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fastdropout: tensor too large");
  return dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
}

// The dropout pass (forward, and backward on the gradient).
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads)
dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t numel,
                    RngSource src, uint32_t threshold, acc_type_t<scalar_t> scale) {
  const RngPair rng = resolve_rng(src);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t base = group * kElementsPerPhilox;
  if (base >= numel) return;
  if (kAligned && base + kElementsPerPhilox <= numel) {
    Group8<scalar_t> values;
    values.load(in + base);
    const uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      values[j] = apply_keep((bits >> j) & 1u, values[j], scale);
    }
    values.store(out + base);
    return;
  }
  const uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
  for (int j = 0; j < kElementsPerPhilox && base + j < numel; ++j) {
    out[base + j] = apply_keep((bits >> j) & 1u, in[base + j], scale);
  }
}

// Channel dropout: element i takes the keep bit of mask index i / channel_numel. A thread's 8
// elements span at most two Philox groups of channels; each is computed once.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
channel_dropout_cuda_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                            int64_t numel, int64_t channel_numel, RngSource src,
                            uint32_t threshold, acc_type_t<scalar_t> scale) {
  const RngPair rng = resolve_rng(src);
  const int64_t base =
      (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kElementsPerPhilox;
  if (base >= numel) return;
  int64_t channel = base / channel_numel;
  int64_t within = base - channel * channel_numel;
  int64_t cached_group = -1;
  uint32_t bits = 0;
  for (int j = 0; j < kElementsPerPhilox && base + j < numel; ++j) {
    const int64_t group = channel / kElementsPerPhilox;
    if (group != cached_group) {
      bits = keep_bits8(rng.seed, rng.offset, group, threshold);
      cached_group = group;
    }
    out[base + j] = apply_keep((bits >> (channel % kElementsPerPhilox)) & 1u, in[base + j], scale);
    if (++within == channel_numel) {
      within = 0;
      ++channel;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
keep_mask_cuda_kernel(bool* __restrict__ mask, int64_t numel, RngSource src, uint32_t threshold) {
  const RngPair rng = resolve_rng(src);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t base = group * kElementsPerPhilox;
  if (base >= numel) return;
  const uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
  for (int j = 0; j < kElementsPerPhilox && base + j < numel; ++j) {
    mask[base + j] = (bits >> j) & 1u;
  }
}

// Fused forward. kVector: every pointer 16-byte aligned and (with a bias) the row length a
// multiple of 8, so a group of 8 lies in one row over 8 consecutive bias entries.
template <typename scalar_t, bool kHasBias, bool kVector>
__global__ void __launch_bounds__(kThreads)
bias_dropout_add_forward_cuda_kernel(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ bias,
                                     const scalar_t* __restrict__ residual,
                                     scalar_t* __restrict__ out, int64_t numel, int64_t columns,
                                     RngSource src, uint32_t threshold,
                                     acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  const RngPair rng = resolve_rng(src);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t base = group * kElementsPerPhilox;
  if (base >= numel) return;
  if (kVector && base + kElementsPerPhilox <= numel) {
    Group8<scalar_t> xv, rv, bv;
    xv.load(x + base);
    rv.load(residual + base);
    if (kHasBias) bv.load(bias + base % columns);
    const uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      const acc_t b = kHasBias ? static_cast<acc_t>(bv[j]) : acc_t(0);
      xv[j] = bias_dropout_add_element<kHasBias>((bits >> j) & 1u, xv[j], b, rv[j], scale);
    }
    xv.store(out + base);
    return;
  }
  const uint32_t bits = keep_bits8(rng.seed, rng.offset, group, threshold);
  int64_t col = kHasBias ? base % columns : 0;
  for (int j = 0; j < kElementsPerPhilox && base + j < numel; ++j) {
    const acc_t b = kHasBias ? static_cast<acc_t>(bias[col]) : acc_t(0);
    out[base + j] = bias_dropout_add_element<kHasBias>((bits >> j) & 1u, x[base + j], b,
                                                       residual[base + j], scale);
    if (kHasBias && ++col == columns) col = 0;
  }
}

// Fused backward, first step: grad_x = keep ? grad * scale : 0, and the column sums of grad_x
// over this block's chunk of rows into partials[chunk, column] (float32, float64 for double).
// kVector: each thread owns 8 consecutive columns (one Philox group per row); otherwise one
// column, one Philox call per element.
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
bias_dropout_add_backward_cuda_kernel(const scalar_t* __restrict__ grad,
                                      scalar_t* __restrict__ grad_x,
                                      acc_type_t<scalar_t>* __restrict__ partials, int64_t rows,
                                      int64_t columns, int64_t rows_per_chunk, RngSource src,
                                      uint32_t threshold, acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  const RngPair rng = resolve_rng(src);
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = row_begin + rows_per_chunk < rows ? row_begin + rows_per_chunk : rows;
  acc_t* partial = partials + chunk * columns;
  if (kVector) {
    const int64_t col = lane * kElementsPerPhilox;
    if (col >= columns) return;
    acc_t sums[kElementsPerPhilox] = {};
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t base = row * columns + col;
      Group8<scalar_t> g;
      g.load(grad + base);
      const uint32_t bits =
          keep_bits8(rng.seed, rng.offset, base / kElementsPerPhilox, threshold);
#pragma unroll
      for (int j = 0; j < kElementsPerPhilox; ++j) {
        g[j] = apply_keep((bits >> j) & 1u, g[j], scale);
        sums[j] = add_rn(sums[j], static_cast<acc_t>(g[j]));
      }
      g.store(grad_x + base);
    }
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) partial[col + j] = sums[j];
    return;
  }
  const int64_t col = lane;
  if (col >= columns) return;
  acc_t sum = 0;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t i = row * columns + col;
    const scalar_t g = apply_keep(keep_element(rng.seed, rng.offset, i, threshold), grad[i], scale);
    grad_x[i] = g;
    sum = add_rn(sum, static_cast<acc_t>(g));
  }
  partial[col] = sum;
}

// Fused backward, second step: grad_bias[c] = sum of partials[:, c] in chunk order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
bias_grad_reduce_cuda_kernel(const acc_type_t<scalar_t>* __restrict__ partials, int64_t chunks,
                             int64_t columns, scalar_t* __restrict__ grad_bias) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= columns) return;
  acc_type_t<scalar_t> total = 0;
  for (int64_t k = 0; k < chunks; ++k) total = add_rn(total, partials[k * columns + col]);
  grad_bias[col] = static_cast<scalar_t>(total);
}

template <typename scalar_t, bool kHasBias>
void launch_bias_dropout_add_forward(bool vector, dim3 grid, cudaStream_t stream,
                                     const scalar_t* x, const scalar_t* bias,
                                     const scalar_t* residual, scalar_t* out, int64_t numel,
                                     int64_t columns, const RngSource& src, uint32_t threshold,
                                     acc_type_t<scalar_t> scale) {
  if (vector) {
    bias_dropout_add_forward_cuda_kernel<scalar_t, kHasBias, true><<<grid, kThreads, 0, stream>>>(
        x, bias, residual, out, numel, columns, src, threshold, scale);
  } else {
    bias_dropout_add_forward_cuda_kernel<scalar_t, kHasBias, false><<<grid, kThreads, 0, stream>>>(
        x, bias, residual, out, numel, columns, src, threshold, scale);
  }
}

}  // namespace

void dropout_pass_cuda(const DropoutPass& pass) {
  const at::Tensor& in = *pass.input;
  at::Tensor& out = *pass.output;
  const c10::cuda::CUDAGuard guard(in.device());
  const RngSource src = make_rng_source(*pass.rng_state, pass.request, in.device());
  const uint32_t threshold = drop_threshold(pass.p);
  const int64_t numel = in.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  FD_DISPATCH_FLOAT_TYPES(in.scalar_type(), "dropout_cuda", [&] {
    const auto scale = keep_scale<acc_type_t<scalar_t>>(pass.p);
    const scalar_t* src_ptr = in.const_data_ptr<scalar_t>();
    scalar_t* dst_ptr = out.mutable_data_ptr<scalar_t>();
    const dim3 grid = group_grid(numel);
    if (pass.channel_numel != 1) {
      channel_dropout_cuda_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          src_ptr, dst_ptr, numel, pass.channel_numel, src, threshold, scale);
    } else if (aligned16(src_ptr) && aligned16(dst_ptr)) {
      dropout_cuda_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          src_ptr, dst_ptr, numel, src, threshold, scale);
    } else {
      dropout_cuda_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          src_ptr, dst_ptr, numel, src, threshold, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void keep_mask_cuda(at::Tensor& mask, const at::Tensor& rng_state, double p) {
  const c10::cuda::CUDAGuard guard(mask.device());
  const RngSource src = make_rng_source(rng_state, nullptr, mask.device());
  const int64_t numel = mask.numel();
  if (numel == 0) return;
  keep_mask_cuda_kernel<<<group_grid(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.mutable_data_ptr<bool>(), numel, src, drop_threshold(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bias_dropout_add_forward_cuda(const BiasDropoutAddForward& args) {
  const at::Tensor& x = *args.x;
  const c10::cuda::CUDAGuard guard(x.device());
  const RngSource src = make_rng_source(*args.rng_state, args.request, x.device());
  const uint32_t threshold = drop_threshold(args.p);
  const int64_t numel = x.numel();
  const bool has_bias = args.bias->defined();
  const int64_t columns = has_bias ? args.bias->numel() : 1;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bias_dropout_add_cuda", [&] {
    const auto scale = keep_scale<acc_type_t<scalar_t>>(args.p);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? args.bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = args.residual->const_data_ptr<scalar_t>();
    scalar_t* op = args.output->mutable_data_ptr<scalar_t>();
    const bool vector = aligned16(xp) && aligned16(rp) && aligned16(op) &&
                        (!has_bias || (aligned16(bp) && columns % kElementsPerPhilox == 0));
    const dim3 grid = group_grid(numel);
    if (has_bias) {
      launch_bias_dropout_add_forward<scalar_t, true>(vector, grid, stream, xp, bp, rp, op, numel,
                                                      columns, src, threshold, scale);
    } else {
      launch_bias_dropout_add_forward<scalar_t, false>(vector, grid, stream, xp, bp, rp, op,
                                                       numel, columns, src, threshold, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_dropout_add_backward_cuda(const BiasDropoutAddBackward& args) {
  const at::Tensor& grad = *args.grad;
  const c10::cuda::CUDAGuard guard(grad.device());
  const RngSource src = make_rng_source(*args.rng_state, nullptr, grad.device());
  const uint32_t threshold = drop_threshold(args.p);
  const int64_t columns = grad.size(-1);
  const int64_t rows = columns == 0 ? 0 : grad.numel() / columns;
  if (columns == 0) return;
  if (rows == 0) {
    args.grad_bias->zero_();
    return;
  }
  // Chunks of 64 rows (more when there are over 65535 chunks, the grid's y limit): the
  // partials are 1/64 of the gradient's size, and their order is fixed: deterministic.
  const int64_t rows_per_chunk = std::max<int64_t>(64, ceil_div(rows, 65535));
  const int64_t chunks = ceil_div(rows, rows_per_chunk);
  const auto stream = at::cuda::getCurrentCUDAStream();
  FD_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "bias_dropout_add_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t scale = keep_scale<acc_t>(args.p);
    const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    at::Tensor partials = at::empty({chunks, columns}, grad.options().dtype(acc_dtype));
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = args.grad_x->mutable_data_ptr<scalar_t>();
    acc_t* pp = partials.mutable_data_ptr<acc_t>();
    const bool vector =
        aligned16(gp) && aligned16(gxp) && columns % kElementsPerPhilox == 0;
    const int64_t lanes = vector ? columns / kElementsPerPhilox : columns;
    const dim3 grid(static_cast<unsigned>(ceil_div(lanes, kThreads)), static_cast<unsigned>(chunks));
    if (vector) {
      bias_dropout_add_backward_cuda_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          gp, gxp, pp, rows, columns, rows_per_chunk, src, threshold, scale);
    } else {
      bias_dropout_add_backward_cuda_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          gp, gxp, pp, rows, columns, rows_per_chunk, src, threshold, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bias_grad_reduce_cuda_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(columns, kThreads)), kThreads, 0, stream>>>(
            pp, chunks, columns, args.grad_bias->mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastdropout
