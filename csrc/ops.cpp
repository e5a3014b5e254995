// Operator schemas and the device-independent half of each operator: argument checks,
// contiguity and output layout, allocation. The kernels live in cpu/ and cuda/.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "ops.h"

// Importing fastdropout._C runs the static TORCH_LIBRARY initialisers below; the module itself
// is empty (the operators are reached through torch.ops.fastdropout).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastdropout {

using at::Tensor;

void check_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "fastdropout: dropout probability p has to be between 0 and 1, but got ", p);
}

void check_floating(const Tensor& t, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, "fastdropout: ", name,
              " must be a strided (dense) tensor, got layout ", t.layout());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "fastdropout: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "fastdropout: ", name,
              " must be on a CPU or CUDA device, got ", t.device());
}

void check_channel_numel(int64_t channel_numel) {
  TORCH_CHECK(channel_numel >= 1, "fastdropout: channel_numel must be >= 1, got ", channel_numel);
}

void check_rng_state(const Tensor& rng_state, const Tensor& like) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2 &&
                  rng_state.is_contiguous(),
              "fastdropout: rng_state must be a contiguous int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(rng_state.device() == like.device(), "fastdropout: rng_state is on ",
              rng_state.device(), " but the tensor is on ", like.device());
}

namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// How many 2 MiB blocks the kernel's free lists hold right now (/proc/buddyinfo: free blocks of
// each order, order k being 2^k pages; with 4 KiB pages, orders 9 and up are 2 MiB or more),
// or -1 when that cannot be read.
int64_t free_huge_page_blocks() {
  if (sysconf(_SC_PAGESIZE) != 4096) return -1;
  std::FILE* f = std::fopen("/proc/buddyinfo", "r");
  if (f == nullptr) return -1;
  int64_t blocks = 0;
  char line[512];
  while (std::fgets(line, sizeof line, f) != nullptr) {
    // "Node 0, zone   Normal   n0 n1 ... n10"
    const char* p = std::strstr(line, "zone");
    if (p == nullptr) continue;
    p += 4;
    while (*p == ' ') ++p;
    while (*p != ' ' && *p != '\0') ++p;  // the zone's name
    for (int order = 0;; ++order) {
      char* end = nullptr;
      const long long count = std::strtoll(p, &end, 10);
      if (end == p) break;
      if (order >= 9) blocks += count << (order - 9);
      p = end;
    }
  }
  std::fclose(f);
  return blocks;
}
#endif

// Fresh CPU outputs of a few MiB or more are advised as transparent huge pages before their
// first touch: on a 2-core machine the 4 KiB page faults of a new 64 MiB output cost more than
// the whole dropout pass (PyTorch's own allocator does the same under THP_MEM_ALLOC_ENABLE=1).
// But where the kernel's THP defrag setting is "madvise" (the default), a fault in an advised
// range that finds no free 2 MiB block compacts memory on the spot: the first calls of a process
// then stalled for 60-120 ms. So the advice is given only while the free lists already hold
// twice the blocks the output needs (no compaction needed); otherwise the output takes 4 KiB
// pages, as without the advice. Reading /proc/buddyinfo costs tens of microseconds, against
// milliseconds for an output this size.
Tensor advise_huge_pages(Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  if (t.is_cpu() && t.nbytes() >= 2 * kHugePage) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
    const auto needed = static_cast<int64_t>((last - first) / kHugePage);
    if (last > first && free_huge_page_blocks() >= 2 * needed) {
      madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
  }
#endif
  return t;
}

Tensor new_output_like(const Tensor& t) { return advise_huge_pages(at::empty_like(t)); }

Tensor new_rng_state(const Tensor& like) {
  return at::empty({2}, like.options().dtype(at::kLong));
}

// Calls the CPU or the CUDA kernel of an operator, by the device of `t`. Without the CUDA
// kernels `cuda` is nullptr and a CUDA tensor gets an error, not a crash.
#ifdef FASTDROPOUT_WITH_CUDA
#define FD_CUDA_KERNEL(name) name
#else
#define FD_CUDA_KERNEL(name) nullptr
#endif
template <typename CpuKernel, typename CudaKernel, typename... Args>
void on_device(const Tensor& t, CpuKernel cpu, CudaKernel cuda, Args&&... args) {
  if constexpr (!std::is_same_v<CudaKernel, std::nullptr_t>) {
    if (t.is_cuda()) return cuda(std::forward<Args>(args)...);
  }
  TORCH_CHECK(t.is_cpu(), "fastdropout was built without CUDA kernels");
  cpu(std::forward<Args>(args)...);
}

// A fresh output laid out as at::empty_like(like) (PyTorch's dropout output layout) and the
// contiguous buffer the kernels write: the output itself when it is contiguous, else a
// scratch tensor copied into it by finish().
struct OutputBuffer {
  Tensor out;
  Tensor work;
  OutputBuffer(const Tensor& like, const Tensor& contiguous_like)
      : out(new_output_like(like)),
        work(out.is_contiguous() ? out : new_output_like(contiguous_like)) {}
  Tensor finish() {
    if (!work.is_same(out)) out.copy_(work);
    return out;
  }
};

void run_pass(const DropoutPass& pass) {
  on_device(*pass.input, dropout_pass_cpu, FD_CUDA_KERNEL(dropout_pass_cuda), pass);
}

// Whether t's memory is a block transpose of its logical order (see BlockTransposed): its dims,
// size-1 dims aside, split into [outer | a | b] with memory order outer, b, a, each group
// row-major. Tried over every split; a few dims at most.
std::optional<BlockTransposed> block_transposed_layout(const Tensor& t) {
  std::vector<int64_t> sizes, strides;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1) {
      sizes.push_back(t.size(d));
      strides.push_back(t.stride(d));
    }
  }
  const int64_t m = static_cast<int64_t>(sizes.size());
  // dims [lo, hi) row-major with innermost stride `inner`
  auto row_major = [&](int64_t lo, int64_t hi, int64_t inner) {
    int64_t expect = inner;
    for (int64_t d = hi - 1; d >= lo; --d) {
      if (strides[d] != expect) return false;
      expect *= sizes[d];
    }
    return true;
  };
  auto product = [&](int64_t lo, int64_t hi) {
    int64_t n = 1;
    for (int64_t d = lo; d < hi; ++d) n *= sizes[d];
    return n;
  };
  for (int64_t k1 = 0; k1 < m; ++k1) {
    for (int64_t k2 = k1 + 1; k2 < m; ++k2) {
      const int64_t a = product(k1, k2), b = product(k2, m);
      if (row_major(k1, k2, 1) && row_major(k2, m, a) && row_major(0, k1, a * b)) {
        return BlockTransposed{product(0, k1), a, b};
      }
    }
  }
  return std::nullopt;
}

// One pass from `input` into a fresh output, computed on contiguous buffers, or on CUDA in
// place of a block-transposed layout (channels_last): one pass in and one out instead of a
// copy to contiguous, the pass, and a copy back.
Tensor run_pass_out_of_place(const Tensor& input, const Tensor& rng_state,
                             const RngRequest* request, double p, int64_t channel_numel,
                             const RunMap* shard) {
  if (input.is_cuda() && !input.is_contiguous() && shard == nullptr) {
    if (const auto layout = block_transposed_layout(input)) {
      if (channel_numel == 1 || channel_numel == layout->b) {
        Tensor out = new_output_like(input);
        if (out.strides() == input.strides()) {
          run_pass(DropoutPass{&input, &out, &rng_state, request, p, channel_numel, *layout});
          return out;
        }
      }
    }
  }
  const Tensor in = input.contiguous();
  OutputBuffer output(input, in);
  run_pass(DropoutPass{&in, &output.work, &rng_state, request, p, channel_numel, {}, shard});
  return output.finish();
}

}  // namespace

std::tuple<Tensor, Tensor> dropout_forward(const Tensor& x, double p, const RngRequest& request,
                                           int64_t channel_numel, const RunMap* shard) {
  check_p(p);
  check_floating(x, "x");
  check_channel_numel(channel_numel);
  Tensor rng_state = new_rng_state(x);
  Tensor out = run_pass_out_of_place(x, rng_state, &request, p, channel_numel, shard);
  return {out, rng_state};
}

Tensor dropout_forward_inplace(Tensor& x, double p, const RngRequest& request,
                               int64_t channel_numel, const RunMap* shard) {
  check_p(p);
  check_floating(x, "x");
  check_channel_numel(channel_numel);
  at::assert_no_internal_overlap(x);
  Tensor rng_state = new_rng_state(x);
  // An element is read before it is written by the same thread, so in == out is safe.
  Tensor work = x.contiguous();
  run_pass(DropoutPass{&work, &work, &rng_state, &request, p, channel_numel, {}, shard});
  if (!work.is_same(x)) x.copy_(work);
  return rng_state;
}

Tensor dropout_backward(const Tensor& grad, const Tensor& rng_state, double p,
                        int64_t channel_numel, const RunMap* shard) {
  check_p(p);
  check_floating(grad, "grad");
  check_rng_state(rng_state, grad);
  check_channel_numel(channel_numel);
  return run_pass_out_of_place(grad, rng_state, nullptr, p, channel_numel, shard);
}

namespace {

std::tuple<Tensor, Tensor> dropout_op(const Tensor& x, double p, std::optional<int64_t> seed,
                                      int64_t offset, std::optional<at::Generator> generator,
                                      int64_t channel_numel) {
  return dropout_forward(x, p, RngRequest{seed, offset, std::move(generator)}, channel_numel,
                         nullptr);
}

Tensor dropout_inplace_op(Tensor& x, double p, std::optional<int64_t> seed, int64_t offset,
                          std::optional<at::Generator> generator, int64_t channel_numel) {
  return dropout_forward_inplace(x, p, RngRequest{seed, offset, std::move(generator)},
                                 channel_numel, nullptr);
}

Tensor dropout_backward_op(const Tensor& grad, const Tensor& rng_state, double p,
                           int64_t channel_numel) {
  return dropout_backward(grad, rng_state, p, channel_numel, nullptr);
}

Tensor dropout_mask_op(const Tensor& rng_state, int64_t numel, double p) {
  check_p(p);
  TORCH_CHECK(numel >= 0, "fastdropout: numel must be >= 0, got ", numel);
  check_rng_state(rng_state, rng_state);
  Tensor mask = advise_huge_pages(at::empty({numel}, rng_state.options().dtype(at::kBool)));
  on_device(rng_state, keep_mask_cpu, FD_CUDA_KERNEL(keep_mask_cuda), mask, rng_state, p);
  return mask;
}

void check_bias_residual(const Tensor& x, const std::optional<Tensor>& bias,
                         const Tensor& residual) {
  check_floating(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "fastdropout: residual must have x's shape ",
              x.sizes(), ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && residual.device() == x.device(),
              "fastdropout: residual must have x's dtype and device (", x.scalar_type(), ", ",
              x.device(), "), got ", residual.scalar_type(), ", ", residual.device());
  if (!bias.has_value()) return;
  check_floating(*bias, "bias");
  TORCH_CHECK(x.dim() >= 1 && bias->dim() == 1 && bias->size(0) == x.size(-1),
              "fastdropout: bias must be 1-d with x.shape[-1] elements (",
              x.dim() >= 1 ? x.size(-1) : 0, "), got shape ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
              "fastdropout: bias must have x's dtype and device (", x.scalar_type(), ", ",
              x.device(), "), got ", bias->scalar_type(), ", ", bias->device());
}

}  // namespace

std::tuple<Tensor, Tensor> bias_dropout_add_forward(const Tensor& x,
                                                    const std::optional<Tensor>& bias,
                                                    const Tensor& residual, double p,
                                                    const RngRequest& request,
                                                    const RunMap* shard) {
  check_p(p);
  check_floating(x, "x");
  check_bias_residual(x, bias, residual);
  const Tensor xc = x.contiguous();
  const Tensor rc = residual.contiguous();
  const Tensor bc = bias.has_value() ? bias->contiguous() : Tensor();
  OutputBuffer output(x, xc);
  Tensor rng_state = new_rng_state(x);
  const BiasDropoutAddForward args{&xc, &bc, &rc, &output.work, &rng_state, &request, p, shard};
  on_device(x, bias_dropout_add_forward_cpu, FD_CUDA_KERNEL(bias_dropout_add_forward_cuda), args);
  return {output.finish(), rng_state};
}

std::tuple<Tensor, Tensor> bias_dropout_add_backward(const Tensor& grad, const Tensor& rng_state,
                                                     double p, const RunMap* shard) {
  check_p(p);
  check_floating(grad, "grad");
  check_rng_state(rng_state, grad);
  TORCH_CHECK(grad.dim() >= 1, "fastdropout: grad must have at least one dimension");
  const Tensor gc = grad.contiguous();
  Tensor grad_x = new_output_like(gc);
  Tensor grad_bias = at::empty({grad.size(-1)}, grad.options());
  const BiasDropoutAddBackward args{&gc, &rng_state, &grad_x, &grad_bias, p, shard};
  on_device(grad, bias_dropout_add_backward_cpu, FD_CUDA_KERNEL(bias_dropout_add_backward_cuda),
            args);
  return {grad_x, grad_bias};
}

namespace {

std::tuple<Tensor, Tensor> bias_dropout_add_op(const Tensor& x, const std::optional<Tensor>& bias,
                                               const Tensor& residual, double p,
                                               std::optional<int64_t> seed, int64_t offset,
                                               std::optional<at::Generator> generator) {
  return bias_dropout_add_forward(x, bias, residual, p,
                                  RngRequest{seed, offset, std::move(generator)}, nullptr);
}

std::tuple<Tensor, Tensor> bias_dropout_add_backward_op(const Tensor& grad,
                                                        const Tensor& rng_state, double p) {
  return bias_dropout_add_backward(grad, rng_state, p, nullptr);
}

// Philox4x32-10 itself, for the known-answer tests: the same function every kernel calls.
std::vector<int64_t> philox_op(at::IntArrayRef counter, at::IntArrayRef key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2,
              "fastdropout: _philox4x32_10 takes 4 counter words and 2 key words");
  const Philox4x32<uint32_t> r = philox4x32_10<uint32_t>(
      static_cast<uint32_t>(counter[0]), static_cast<uint32_t>(counter[1]),
      static_cast<uint32_t>(counter[2]), static_cast<uint32_t>(counter[3]),
      static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {r.w[0], r.w[1], r.w[2], r.w[3]};
}

}  // namespace

TORCH_LIBRARY(fastdropout, m) {
  // Seeded random ops: torch.compile must neither merge two calls nor reorder them across the
  // generator.
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def(
      "dropout(Tensor x, float p, SymInt? seed=None, SymInt offset=0, Generator? generator=None, "
      "int channel_numel=1) -> (Tensor, Tensor)",
      seeded);
  m.def(
      "dropout_(Tensor(a!) x, float p, SymInt? seed=None, SymInt offset=0, Generator? generator=None, "
      "int channel_numel=1) -> Tensor",
      seeded);
  m.def("dropout_backward(Tensor grad, Tensor rng_state, float p, int channel_numel=1) -> Tensor");
  m.def("dropout_mask(Tensor rng_state, int numel, float p) -> Tensor");
  m.def(
      "bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, float p, SymInt? seed=None, "
      "SymInt offset=0, Generator? generator=None) -> (Tensor, Tensor)",
      seeded);
  m.def("bias_dropout_add_backward(Tensor grad, Tensor rng_state, float p) -> (Tensor, Tensor)");
  m.def("_philox4x32_10(int[] counter, int[] key) -> int[]", &philox_op);
}

// The same operator bodies serve both backends: they differ only in the kernel they call.
#define FASTDROPOUT_REGISTER_BACKEND(KEY)                                  \
  TORCH_LIBRARY_IMPL(fastdropout, KEY, m) {                                \
    m.impl("dropout", &dropout_op);                                        \
    m.impl("dropout_", &dropout_inplace_op);                               \
    m.impl("dropout_backward", &dropout_backward_op);                      \
    m.impl("dropout_mask", &dropout_mask_op);                              \
    m.impl("bias_dropout_add", &bias_dropout_add_op);                      \
    m.impl("bias_dropout_add_backward", &bias_dropout_add_backward_op);    \
  }

FASTDROPOUT_REGISTER_BACKEND(CPU)
#ifdef FASTDROPOUT_WITH_CUDA
FASTDROPOUT_REGISTER_BACKEND(CUDA)
#endif

}  // namespace fastdropout
