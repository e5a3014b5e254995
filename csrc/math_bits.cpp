// In-place dropout on a tensor with the negative bit set (torch._neg_view, or what x.neg()
// hands out lazily). PyTorch's generic math-bits fallback handles an in-place op by running it
// on a resolved clone and then requires the op's first return to be that clone; fastdropout::
// dropout_ returns its rng state instead (a custom op may not return an alias of its input:
// functionalization, hence torch.compile, refuses those). This kernel does the same job for
// dropout_ itself: run on the resolved values, write them back through the negative view.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fastdropout {
namespace {

using at::Tensor;

Tensor dropout_inplace_negative(c10::DispatchKeySet ks, Tensor& x, double p,
                                std::optional<int64_t> seed, int64_t offset,
                                std::optional<at::Generator> generator, int64_t channel_numel) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastdropout::dropout_", "")
          .typed<Tensor(Tensor&, double, std::optional<int64_t>, int64_t,
                        std::optional<at::Generator>, int64_t)>();
  Tensor resolved = x.resolve_neg();  // a copy holding the logical values, no negative bit
  const auto below = ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER,
                                              c10::DispatchKey::Negative);
  Tensor rng_state = op.redispatch(below, resolved, p, seed, offset, std::move(generator),
                                   channel_numel);
  x.copy_(resolved);  // copy_ into a negative view stores the negation: x reads as `resolved`
  return rng_state;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdropout, Negative, m) {
  m.impl("dropout_", &dropout_inplace_negative);
}

}  // namespace fastdropout
