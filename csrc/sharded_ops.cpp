// Operators of the sharded path (DTensor shards, fastdropout/dtensor.py): the local tensor of a
// shard and the map from its elements to the global tensor's logical indices (run_map.h). Each
// is the unsharded operator of the same name (ops.cpp, the same checks and kernels) handed the
// map, with the map's five arguments after p:
//
//   sharded_dropout(x, p, run_length, run_counts, run_strides, run_base, seed, offset,
//                   generator, channel_numel) -> (out, rng_state)
//   sharded_dropout_(x, p, <map>, seed, offset, generator, channel_numel) -> rng_state
//   sharded_dropout_backward(grad, rng_state, p, <map>, channel_numel) -> grad_in
//   sharded_bias_dropout_add(x, bias, residual, p, <map>, seed, offset, generator)
//       -> (out, rng_state)
//   sharded_bias_dropout_add_backward(grad, rng_state, p, <map>) -> (grad_x, grad_bias)
//
// (seed, offset) are taken exactly as by fastdropout::dropout (an explicit seed, or one draw
// from the generator: the same draw on every rank whose generator is in the same state), so a
// shard's result is its slice of what dropout() gives for the whole tensor. Their autograd is
// the unsharded operators' (csrc/autograd.cpp, the Node keeping the map), their fake kernels are
// registered in Python (fastdropout/dtensor.py); within a DTensor call they run below the
// unsharded operators' own autograd.
#include <ATen/core/Tensor.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "ops.h"

namespace fastdropout {
namespace {

using at::Tensor;

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
  // What the map covers, and its largest global index (the kernels' 64-bit arithmetic, and
  // their dividers, need it below 2^63), both checked for overflow.
  uint64_t covered = static_cast<uint64_t>(run_length);
  uint64_t last = static_cast<uint64_t>(run_base) + static_cast<uint64_t>(run_length) - 1;
  bool overflow = false;
  for (int l = 0; l < map.levels; ++l) {
    TORCH_CHECK(run_counts[l] >= 1 && run_strides[l] >= 0,
                "fastdropout: run_counts must be >= 1 and run_strides >= 0");
    map.counts[l] = run_counts[l];
    map.strides[l] = run_strides[l];
    uint64_t span = 0;
    overflow |= c10::mul_overflows(covered, static_cast<uint64_t>(run_counts[l]), &covered);
    overflow |= c10::mul_overflows(static_cast<uint64_t>(run_counts[l] - 1),
                                   static_cast<uint64_t>(run_strides[l]), &span);
    overflow |= c10::add_overflows(last, span, &last);
  }
  TORCH_CHECK(!overflow && covered < (uint64_t{1} << 63) && last < (uint64_t{1} << 63),
              "fastdropout: the run map's global indices do not fit in 63 bits");
  TORCH_CHECK(static_cast<int64_t>(covered) == t.numel() || t.numel() == 0,
              "fastdropout: the run map covers ",
              covered, " elements but the local tensor has ", t.numel());
  return map;
}

// The fused kernels index the bias by the local column: every run must hold whole rows.
RunMap make_row_run_map(const Tensor& t, int64_t run_length, at::IntArrayRef run_counts,
                        at::IntArrayRef run_strides, int64_t run_base) {
  const RunMap map = make_run_map(t, run_length, run_counts, run_strides, run_base);
  TORCH_CHECK(t.dim() >= 1, "fastdropout: x must have at least one dimension");
  TORCH_CHECK(t.numel() == 0 || run_length % t.size(-1) == 0,
              "fastdropout: run_length (", run_length, ") must be a multiple of the local last "
              "dimension (", t.size(-1), ")");
  return map;
}

std::tuple<Tensor, Tensor> sharded_dropout_op(const Tensor& x, double p, int64_t run_length,
                                              at::IntArrayRef run_counts,
                                              at::IntArrayRef run_strides, int64_t run_base,
                                              std::optional<int64_t> seed, int64_t offset,
                                              std::optional<at::Generator> generator,
                                              int64_t channel_numel) {
  const RunMap map = make_run_map(x, run_length, run_counts, run_strides, run_base);
  return dropout_forward(x, p, RngRequest{seed, offset, std::move(generator)}, channel_numel,
                         &map);
}

Tensor sharded_dropout_inplace_op(Tensor& x, double p, int64_t run_length,
                                  at::IntArrayRef run_counts, at::IntArrayRef run_strides,
                                  int64_t run_base, std::optional<int64_t> seed, int64_t offset,
                                  std::optional<at::Generator> generator, int64_t channel_numel) {
  const RunMap map = make_run_map(x, run_length, run_counts, run_strides, run_base);
  return dropout_forward_inplace(x, p, RngRequest{seed, offset, std::move(generator)},
                                 channel_numel, &map);
}

Tensor sharded_dropout_backward_op(const Tensor& grad, const Tensor& rng_state, double p,
                                   int64_t run_length, at::IntArrayRef run_counts,
                                   at::IntArrayRef run_strides, int64_t run_base,
                                   int64_t channel_numel) {
  const RunMap map = make_run_map(grad, run_length, run_counts, run_strides, run_base);
  return dropout_backward(grad, rng_state, p, channel_numel, &map);
}

std::tuple<Tensor, Tensor> sharded_bias_dropout_add_op(
    const Tensor& x, const std::optional<Tensor>& bias, const Tensor& residual, double p,
    int64_t run_length, at::IntArrayRef run_counts, at::IntArrayRef run_strides,
    int64_t run_base, std::optional<int64_t> seed, int64_t offset,
    std::optional<at::Generator> generator) {
  const RunMap map = make_row_run_map(x, run_length, run_counts, run_strides, run_base);
  return bias_dropout_add_forward(x, bias, residual, p,
                                  RngRequest{seed, offset, std::move(generator)}, &map);
}

std::tuple<Tensor, Tensor> sharded_bias_dropout_add_backward_op(
    const Tensor& grad, const Tensor& rng_state, double p, int64_t run_length,
    at::IntArrayRef run_counts, at::IntArrayRef run_strides, int64_t run_base) {
  const RunMap map = make_row_run_map(grad, run_length, run_counts, run_strides, run_base);
  return bias_dropout_add_backward(grad, rng_state, p, &map);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdropout, m) {
  // Seeded random ops, as their unsharded forms: torch.compile must not merge two calls.
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def(
      "sharded_dropout(Tensor x, float p, int run_length, int[] run_counts, int[] run_strides, "
      "int run_base, SymInt? seed=None, SymInt offset=0, Generator? generator=None, "
      "int channel_numel=1) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "sharded_dropout_(Tensor(a!) x, float p, int run_length, int[] run_counts, "
      "int[] run_strides, int run_base, SymInt? seed=None, SymInt offset=0, Generator? generator=None, "
      "int channel_numel=1) -> Tensor",
      seeded);
  m.def(
      "sharded_dropout_backward(Tensor grad, Tensor rng_state, float p, int run_length, "
      "int[] run_counts, int[] run_strides, int run_base, int channel_numel=1) -> Tensor");
  m.def(
      "sharded_bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, float p, "
      "int run_length, int[] run_counts, int[] run_strides, int run_base, SymInt? seed=None, "
      "SymInt offset=0, Generator? generator=None) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "sharded_bias_dropout_add_backward(Tensor grad, Tensor rng_state, float p, "
      "int run_length, int[] run_counts, int[] run_strides, int run_base) -> (Tensor, Tensor)");
}

#define FASTDROPOUT_REGISTER_SHARDED_BACKEND(KEY)                                   \
  TORCH_LIBRARY_IMPL(fastdropout, KEY, m) {                                         \
    m.impl("sharded_dropout", &sharded_dropout_op);                                 \
    m.impl("sharded_dropout_", &sharded_dropout_inplace_op);                        \
    m.impl("sharded_dropout_backward", &sharded_dropout_backward_op);               \
    m.impl("sharded_bias_dropout_add", &sharded_bias_dropout_add_op);               \
    m.impl("sharded_bias_dropout_add_backward", &sharded_bias_dropout_add_backward_op); \
  }

FASTDROPOUT_REGISTER_SHARDED_BACKEND(CPU)
#ifdef FASTDROPOUT_WITH_CUDA
FASTDROPOUT_REGISTER_SHARDED_BACKEND(CUDA)
#endif

}  // namespace fastdropout
