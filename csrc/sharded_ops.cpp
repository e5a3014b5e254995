// Operators of the sharded path (DTensor shards, fastdropout/dtensor.py): the local tensor of a
// shard and the map from its elements to the global tensor's logical indices (sharded.h).
//
//   sharded_dropout(x, p, run_length, run_counts, run_strides, run_base, seed, offset,
//                   generator, channel_numel) -> (out, rng_state)
//   sharded_dropout_backward(grad, rng_state, p, run_length, run_counts, run_strides, run_base,
//                            channel_numel) -> grad_in
//
// (seed, offset) are taken exactly as by fastdropout::dropout (an explicit seed, or one draw
// from the generator: the same draw on every rank whose generator is in the same state), so a
// shard's result is its slice of what dropout() gives for the whole tensor. Their autograd and
// fake kernels are registered in Python (fastdropout/dtensor.py); within a DTensor call they
// run below fastdropout::dropout's own autograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "sharded.h"

namespace fastdropout {
namespace {

using at::Tensor;

void check_input(const Tensor& t, const char* name, double p, int64_t channel_numel) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "fastdropout: dropout probability p has to be between 0 and 1, but got ", p);
  TORCH_CHECK(t.layout() == at::kStrided, "fastdropout: ", name, " must be a strided tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "fastdropout: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "fastdropout: ", name,
              " must be on a CPU or CUDA device, got ", t.device());
  TORCH_CHECK(channel_numel >= 1, "fastdropout: channel_numel must be >= 1");
}

// The map, checked against the local tensor: it must cover exactly its elements.
RunMap make_run_map(const Tensor& t, int64_t run_length, at::IntArrayRef run_counts,
                    at::IntArrayRef run_strides, int64_t run_base) {
  TORCH_CHECK(run_counts.size() == run_strides.size(),
              "fastdropout: run_counts and run_strides must have the same length");
  TORCH_CHECK(static_cast<int64_t>(run_counts.size()) <= kMaxRunLevels,
              "fastdropout: at most ", kMaxRunLevels, " run levels, got ", run_counts.size());
  TORCH_CHECK(run_length >= 1 && run_base >= 0, "fastdropout: run_length must be >= 1 and "
              "run_base >= 0, got ", run_length, " and ", run_base);
  RunMap map;
  map.run_length = run_length;
  map.base = run_base;
  map.levels = static_cast<int>(run_counts.size());
  int64_t covered = run_length;
  for (int l = 0; l < map.levels; ++l) {
    TORCH_CHECK(run_counts[l] >= 1 && run_strides[l] >= 0,
                "fastdropout: run_counts must be >= 1 and run_strides >= 0");
    map.counts[l] = run_counts[l];
    map.strides[l] = run_strides[l];
    covered *= run_counts[l];
  }
  TORCH_CHECK(covered == t.numel() || t.numel() == 0, "fastdropout: the run map covers ",
              covered, " elements but the local tensor has ", t.numel());
  return map;
}

void run_sharded_pass(const ShardedPass& pass) {
#ifdef FASTDROPOUT_WITH_CUDA
  if (pass.local.input->is_cuda()) return sharded_dropout_pass_cuda(pass);
#endif
  TORCH_CHECK(pass.local.input->is_cpu(), "fastdropout was built without CUDA kernels");
  sharded_dropout_pass_cpu(pass);
}

Tensor sharded_pass(const Tensor& input, const Tensor& rng_state, const RngRequest* request,
                    double p, int64_t channel_numel, const RunMap& map) {
  const Tensor in = input.contiguous();
  Tensor out = at::empty_like(in);
  run_sharded_pass(
      ShardedPass{DropoutPass{&in, &out, &rng_state, request, p, channel_numel}, map});
  return out;
}

std::tuple<Tensor, Tensor> sharded_dropout_op(const Tensor& x, double p, int64_t run_length,
                                              at::IntArrayRef run_counts,
                                              at::IntArrayRef run_strides, int64_t run_base,
                                              std::optional<int64_t> seed, int64_t offset,
                                              std::optional<at::Generator> generator,
                                              int64_t channel_numel) {
  check_input(x, "x", p, channel_numel);
  const RunMap map = make_run_map(x, run_length, run_counts, run_strides, run_base);
  Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  const RngRequest request{seed, offset, std::move(generator)};
  Tensor out = sharded_pass(x, rng_state, &request, p, channel_numel, map);
  return {out, rng_state};
}

Tensor sharded_dropout_backward_op(const Tensor& grad, const Tensor& rng_state, double p,
                                   int64_t run_length, at::IntArrayRef run_counts,
                                   at::IntArrayRef run_strides, int64_t run_base,
                                   int64_t channel_numel) {
  check_input(grad, "grad", p, channel_numel);
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2 &&
                  rng_state.is_contiguous() && rng_state.device() == grad.device(),
              "fastdropout: rng_state must be a contiguous int64 tensor of 2 elements (seed, "
              "offset) on the gradient's device");
  const RunMap map = make_run_map(grad, run_length, run_counts, run_strides, run_base);
  return sharded_pass(grad, rng_state, nullptr, p, channel_numel, map);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdropout, m) {
  // A seeded random op, as fastdropout::dropout: torch.compile must not merge two calls.
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def(
      "sharded_dropout(Tensor x, float p, int run_length, int[] run_counts, int[] run_strides, "
      "int run_base, int? seed=None, int offset=0, Generator? generator=None, "
      "int channel_numel=1) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "sharded_dropout_backward(Tensor grad, Tensor rng_state, float p, int run_length, "
      "int[] run_counts, int[] run_strides, int run_base, int channel_numel=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdropout, CPU, m) {
  m.impl("sharded_dropout", &sharded_dropout_op);
  m.impl("sharded_dropout_backward", &sharded_dropout_backward_op);
}
#ifdef FASTDROPOUT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdropout, CUDA, m) {
  m.impl("sharded_dropout", &sharded_dropout_op);
  m.impl("sharded_dropout_backward", &sharded_dropout_backward_op);
}
#endif

}  // namespace fastdropout
