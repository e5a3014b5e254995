// Internal interface between the operators (ops.cpp, sharded_ops.cpp) and the per-device
// kernels (cpu/dropout_cpu.cpp; cuda/dropout.cu, channel_dropout.cu, bias_dropout_add.cu). The
// operators validate, make inputs contiguous and allocate; the kernels see only contiguous
// buffers of one dtype (or, on CUDA, one block-transposed layout), and a shard's run map.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include "dropout_contract.h"
#include "run_map.h"

// The dtypes every kernel takes, dispatched in one place.
#define FD_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace fastdropout {

// Where a forward call takes its (seed, offset) from. With `seed` set: exactly (seed, offset),
// on every device. Otherwise from `generator` (or the default generator of the tensor's device):
// on CUDA its Philox state advanced by 4 under its lock (graph-capture safe), offset =
// generator offset / 4; on the CPU one 64-bit draw for the seed and offset 0.
struct RngRequest {
  std::optional<int64_t> seed;
  int64_t offset = 0;
  std::optional<at::Generator> generator;
};

// One dropout pass over `numel` contiguous elements: out = keep ? in * scale : 0, where the
// keep bit of element i is the contract's bit for index i / channel_numel (1 for plain dropout,
// H*W for 2-d channel dropout). `request` set: draw a fresh (seed, offset) and record it in
// rng_state (int64[2], on the tensors' device). `request` null: replay the one in rng_state
// (the backward pass). Grad and forward are the same pass: grad_in = keep ? grad * scale : 0.
// A dense layout that is a block transpose of the logical order: logically (outer, a, b), in
// memory (outer, b, a). channels_last (N, C, H, W) is one (outer = N, a = C, b = H * W), and so
// is the transpose of the last two dimensions of a contiguous tensor. outer == 0: the buffers
// are contiguous (the usual case).
struct BlockTransposed {
  int64_t outer = 0;
  int64_t a = 0;
  int64_t b = 0;
};

struct DropoutPass {
  const at::Tensor* input;
  at::Tensor* output;
  const at::Tensor* rng_state;
  const RngRequest* request;
  double p;
  int64_t channel_numel;
  // CUDA only: input and output share this layout and are read and written in place of it,
  // one pass (channel_numel is then 1, or b: one channel per (outer, a) row).
  BlockTransposed transposed = {};
  // A DTensor shard's map (run_map.h): element e takes the bit of mask index
  // global(e) / channel_numel. Null: global(e) = e. The buffers are then contiguous.
  const RunMap* shard = nullptr;
};

// out = residual + (keep ? (x + bias) * scale : 0), float32 (float64) arithmetic, rounded once.
// bias may be undefined; otherwise 1-d of x's last dimension.
struct BiasDropoutAddForward {
  const at::Tensor* x;
  const at::Tensor* bias;
  const at::Tensor* residual;
  at::Tensor* output;
  const at::Tensor* rng_state;
  const RngRequest* request;
  double p;
  const RunMap* shard = nullptr;  // as DropoutPass::shard; the bias is the shard's columns
};

// grad_x = keep ? grad * scale : 0 and grad_bias = sum of grad_x over the leading dimensions,
// in one pass, deterministic (per-block float32 partials, then a fixed-order reduction).
struct BiasDropoutAddBackward {
  const at::Tensor* grad;
  const at::Tensor* rng_state;
  at::Tensor* grad_x;
  at::Tensor* grad_bias;  // undefined: no bias
  double p;
  // As DropoutPass::shard. grad_bias is then the sum over the shard's own rows, in the
  // contract's order over the local rows.
  const RunMap* shard = nullptr;
};

void dropout_pass_cpu(const DropoutPass& pass);
void keep_mask_cpu(at::Tensor& mask, const at::Tensor& rng_state, double p);
void bias_dropout_add_forward_cpu(const BiasDropoutAddForward& args);
void bias_dropout_add_backward_cpu(const BiasDropoutAddBackward& args);

#ifdef FASTDROPOUT_WITH_CUDA
void dropout_pass_cuda(const DropoutPass& pass);
void keep_mask_cuda(at::Tensor& mask, const at::Tensor& rng_state, double p);
void bias_dropout_add_forward_cuda(const BiasDropoutAddForward& args);
void bias_dropout_add_backward_cuda(const BiasDropoutAddBackward& args);
#endif

// The CPU rule for RngRequest (also used when a CPU generator is named): seed from one
// random64() of the generator under its lock, offset 0.
RngPair acquire_cpu_rng(const RngRequest& request);

}  // namespace fastdropout
