// Fused bias + dropout + residual on CUDA: out = residual + (keep ? (x + bias) * scale : 0),
// and its backward: grad_x = keep ? grad * scale : 0 with grad_bias = column sums of grad_x,
// summed in the order dropout_contract.h fixes, so that grad_bias is bit-identical to the
// CPU's and deterministic. The forward and the bias-gradient kernel are templated on their mask
// index (kernel_utils.cuh): on a DTensor shard (ShardIndex) an element takes the bit of its
// global index, the bias is the shard's columns and grad_bias sums the shard's rows.
#include "kernel_utils.cuh"

namespace fastdropout {
namespace cuda {
namespace {

// Forward. kVector: every pointer 16-byte aligned and (with a bias) the row length a multiple
// of 8, so a group of 8 lies in one row over 8 consecutive bias entries. The column of a group
// comes from one division by a launch-wide divisor (a multiply-high, GroupDivider).
template <typename scalar_t, bool kHasBias, bool kVector, typename Index>
__global__ void __launch_bounds__(kThreads)
bias_dropout_add_forward_cuda_kernel(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ bias,
                                     const scalar_t* __restrict__ residual,
                                     scalar_t* __restrict__ out, int64_t numel,
                                     int64_t columns, GroupDivider column_of, Index index,
                                     RngSource src, uint32_t threshold,
                                     acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t group = thread_group();
  const int64_t base = group * kElementsPerPhilox;
  const int count = group_count(base, numel);
  const bool packed = kVector && count == kElementsPerPhilox;
  Group8<scalar_t> xv, rv;
  if (packed) {
    xv.load(x + base);
    rv.load(residual + base);
  }
  // One call site for every thread, past the end too (see dropout_group_aligned).
  const RngPair rng = resolve_rng(src);
  if (count == 0) return;
  if (packed) {
    // (its own keep_bits call, of 8: one shared with the scalar path spilled fp64 on sm_90)
    const uint32_t bits = index.keep_bits(rng, group, kElementsPerPhilox, threshold);
    // The bias (a few KiB, in L1/L2 after the first rows) is read after the Philox rounds: it
    // would only lengthen the live ranges across them (fp64 spilled on sm_80 otherwise).
    Group8<scalar_t> bv;
    if (kHasBias) {
      int64_t row, column_group;
      column_of.divmod(group, &row, &column_group);  // divisor: columns / 8
      bv.load(bias + column_group * kElementsPerPhilox);
    }
#pragma unroll
    for (int j = 0; j < kElementsPerPhilox; ++j) {
      const acc_t b = kHasBias ? static_cast<acc_t>(bv[j]) : acc_t(0);
      xv[j] = bias_dropout_add_element<kHasBias>((bits >> j) & 1u, xv[j], b, rv[j], scale);
    }
    xv.store(out + base);
    return;
  }
  // Scalar path (misaligned buffers, a bias row not a multiple of 8, the last partial group):
  // element by element after the Philox call, which keeps few values live across it.
  const uint32_t bits = index.keep_bits(rng, group, count, threshold);
  int64_t column = 0;
  if (kHasBias) {
    int64_t row;
    if (kVector) {  // unreachable with a bias (numel is then a multiple of 8); exact anyway
      column_of.divmod(group, &row, &column);
      column *= kElementsPerPhilox;
    } else {
      column_of.divmod(base, &row, &column);  // divisor: columns
    }
  }
  for (int j = 0; j < count; ++j) {
    const acc_t b = kHasBias ? static_cast<acc_t>(bias[column]) : acc_t(0);
    out[base + j] = bias_dropout_add_element<kHasBias>((bits >> j) & 1u, x[base + j], b,
                                                       residual[base + j], scale);
    if (kHasBias && ++column == columns) column = 0;
  }
}

// How the bias-gradient partial kernel lays threads over (chunk, slice, column unit): a block
// of kThreads threads holds unit_lanes consecutive column units (kCols columns each) x the
// kBiasGradSlices slices x chunks_per_block chunks, so that narrow rows still fill the block.
struct BiasGradLayout {
  int64_t rows;
  int64_t columns;
  int64_t units;        // columns / kCols
  int64_t chunks;       // ceil(rows / kBiasGradChunkRows)
  int unit_lanes;       // power of two <= 32
  int chunks_per_block;
  int64_t unit_blocks;  // ceil(units / unit_lanes)

  BiasGradLayout(int64_t rows_, int64_t columns_, int cols_per_unit)
      : rows(rows_), columns(columns_), units(columns_ / cols_per_unit) {
    chunks = ceil_div(rows, kBiasGradChunkRows);
    unit_lanes = 1;
    while (unit_lanes < kWarp && unit_lanes < units) unit_lanes *= 2;
    chunks_per_block = kThreads / (unit_lanes * kBiasGradSlices);
    unit_blocks = ceil_div(units, unit_lanes);
  }
  int64_t blocks() const { return unit_blocks * ceil_div(chunks, chunks_per_block); }
};

// Backward, first step: each thread sums one slice (8 rows) of kCols columns, the block adds its
// slices by the contract's tree in shared memory, and writes one partial row per chunk.
// kMask: grad_x = keep ? grad * scale : 0 is computed and written here (kCols = 8, one Philox
// call per row); otherwise `grad` already is grad_x (the misaligned path, kCols = 1) and is
// only summed. Rows are loaded kPrefetch at a time ahead of their Philox rounds.
template <typename scalar_t, int kCols, bool kMask, typename Index>
__global__ void __launch_bounds__(kThreads)
bias_grad_partials_cuda_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_x,
                               acc_type_t<scalar_t>* __restrict__ partials, BiasGradLayout layout,
                               Index index, RngSource src, uint32_t threshold,
                               acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  using Row = std::conditional_t<kCols == kElementsPerPhilox, Group8<scalar_t>, scalar_t[1]>;
  // Rows in flight per thread: 8 x 16 bytes for 2-byte types, 4 x 32 for fp32; fp64 one row
  // (64 bytes) at a time, which keeps the sm_80 build free of spills.
  constexpr int kPrefetch = kCols == 1             ? kBiasGradSliceRows
                            : sizeof(scalar_t) == 8 ? 1
                                                    : static_cast<int>(16 / sizeof(scalar_t));
  // Column j of thread slot s at slice_sums[j * kThreads + s]: neighbouring lanes hit
  // neighbouring banks.
  __shared__ acc_t slice_sums[kThreads * kCols];

  const int t = threadIdx.x;
  const int unit_local = t % layout.unit_lanes;
  const int slice = (t / layout.unit_lanes) % kBiasGradSlices;
  const int chunk_local = t / (layout.unit_lanes * kBiasGradSlices);
  // The block count is checked below 2^31 on the host: 32-bit division, not the 64-bit routine.
  const auto unit_blocks = static_cast<unsigned>(layout.unit_blocks);
  const int64_t unit = int64_t{blockIdx.x % unit_blocks} * layout.unit_lanes + unit_local;
  const int64_t chunk = int64_t{blockIdx.x / unit_blocks} * layout.chunks_per_block + chunk_local;
  const bool active = unit < layout.units && chunk < layout.chunks;
  const int64_t column = unit * kCols;
  const int64_t first_row = chunk * kBiasGradChunkRows + slice * kBiasGradSliceRows;
  const int rows_here =
      active ? static_cast<int>(std::max<int64_t>(
                   0, std::min<int64_t>(kBiasGradSliceRows, layout.rows - first_row)))
             : 0;

  acc_t sums[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) sums[j] = acc_t(0);
  RngPair rng{0, 0};
#pragma unroll
  for (int r0 = 0; r0 < kBiasGradSliceRows; r0 += kPrefetch) {
    Row values[kPrefetch];
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (r0 + i < rows_here) {
        const scalar_t* row = grad + (first_row + r0 + i) * layout.columns + column;
        if constexpr (kCols == kElementsPerPhilox) {
          values[i].load(row);
        } else {
          values[i][0] = row[0];
        }
      }
    }
    if (kMask && r0 == 0) rng = resolve_rng(src);
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (r0 + i < rows_here) {
        const int64_t base = (first_row + r0 + i) * layout.columns + column;
        if constexpr (kMask) {
          // Rows of columns % 8 == 0 columns; a shard's runs hold whole rows.
          const uint32_t bits = index.keep_bits_in_run(rng, base / kElementsPerPhilox, threshold);
#pragma unroll
          for (int j = 0; j < kCols; ++j) {
            values[i][j] = apply_keep((bits >> j) & 1u, values[i][j], scale);
          }
          values[i].store(grad_x + base);
        }
#pragma unroll
        for (int j = 0; j < kCols; ++j) sums[j] = add_rn(sums[j], static_cast<acc_t>(values[i][j]));
      }
    }
  }

  // The contract's tree over the chunk's slices: stride 4, 2, 1.
  acc_t* mine = slice_sums + (chunk_local * kBiasGradSlices + slice) * layout.unit_lanes +
                unit_local;
#pragma unroll
  for (int j = 0; j < kCols; ++j) mine[j * kThreads] = sums[j];
#pragma unroll
  for (int stride = kBiasGradSlices / 2; stride >= 1; stride /= 2) {
    __syncthreads();
    if (slice < stride) {
      const int partner = stride * layout.unit_lanes;  // the same unit, slice + stride
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        mine[j * kThreads] = add_rn(mine[j * kThreads], mine[j * kThreads + partner]);
      }
    }
  }
  if (slice == 0 && active) {
    acc_t* partial = partials + chunk * layout.columns + column;
#pragma unroll
    for (int j = 0; j < kCols; ++j) partial[j] = mine[j * kThreads];
  }
}

// Backward, fan-in level: each run of kBiasGradFanIn consecutive partial rows becomes one, by
// the contract's tree (absent rows are +0). Threads: 32 columns x 32 rows of a run. kFinal:
// the last level, written as grad_bias itself.
template <typename scalar_t, bool kFinal>
__global__ void __launch_bounds__(kWarp * kBiasGradFanIn)
bias_grad_fan_in_cuda_kernel(const acc_type_t<scalar_t>* __restrict__ in, int64_t n,
                             int64_t columns, int64_t column_blocks,
                             acc_type_t<scalar_t>* __restrict__ out,
                             scalar_t* __restrict__ grad_bias) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t tree[kBiasGradFanIn][kWarp + 1];
  const int tx = threadIdx.x % kWarp;
  const int ty = threadIdx.x / kWarp;
  const auto blocks_per_run = static_cast<unsigned>(column_blocks);  // grid < 2^31 blocks
  const int64_t column = int64_t{blockIdx.x % blocks_per_run} * kWarp + tx;
  const int64_t run = blockIdx.x / blocks_per_run;
  const int64_t entry = run * kBiasGradFanIn + ty;
  tree[ty][tx] = column < columns && entry < n ? in[entry * columns + column] : acc_t(0);
#pragma unroll
  for (int stride = kBiasGradFanIn / 2; stride >= 1; stride /= 2) {
    __syncthreads();
    if (ty < stride) tree[ty][tx] = add_rn(tree[ty][tx], tree[ty + stride][tx]);
  }
  if (ty != 0 || column >= columns) return;
  if (kFinal) {
    grad_bias[column] = round_result<scalar_t>(tree[0][tx]);
  } else {
    out[run * columns + column] = tree[0][tx];
  }
}

// One chunk: its partial is the sum.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
bias_grad_store_cuda_kernel(const acc_type_t<scalar_t>* __restrict__ partial, int64_t columns,
                            scalar_t* __restrict__ grad_bias) {
  const int64_t column = thread_group();
  if (column < columns) grad_bias[column] = round_result<scalar_t>(partial[column]);
}

template <typename scalar_t, bool kHasBias, typename Index>
void launch_bias_dropout_add_forward(bool vector, dim3 grid, cudaStream_t stream,
                                     const scalar_t* x, const scalar_t* bias,
                                     const scalar_t* residual, scalar_t* out, int64_t numel,
                                     int64_t columns, const Index& index, const RngSource& src,
                                     uint32_t threshold, acc_type_t<scalar_t> scale) {
  if (vector) {
    // (without a bias the divider is never used: columns is 1)
    const GroupDivider column_groups(std::max<int64_t>(1, columns / kElementsPerPhilox));
    bias_dropout_add_forward_cuda_kernel<scalar_t, kHasBias, true, Index>
        <<<grid, kThreads, 0, stream>>>(x, bias, residual, out, numel, columns, column_groups,
                                        index, src, threshold, scale);
  } else {
    const GroupDivider column_of(columns);
    bias_dropout_add_forward_cuda_kernel<scalar_t, kHasBias, false, Index>
        <<<grid, kThreads, 0, stream>>>(x, bias, residual, out, numel, columns, column_of, index,
                                        src, threshold, scale);
  }
}

}  // namespace
}  // namespace cuda

void bias_dropout_add_forward_cuda(const BiasDropoutAddForward& args) {
  using namespace cuda;
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
    with_mask_index(args.shard, [&](const auto& index) {
      if (has_bias) {
        launch_bias_dropout_add_forward<scalar_t, true>(vector, grid, stream, xp, bp, rp, op,
                                                        numel, columns, index, src, threshold,
                                                        scale);
      } else {
        launch_bias_dropout_add_forward<scalar_t, false>(vector, grid, stream, xp, bp, rp, op,
                                                         numel, columns, index, src, threshold,
                                                         scale);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_dropout_add_backward_cuda(const BiasDropoutAddBackward& args) {
  using namespace cuda;
  const at::Tensor& grad = *args.grad;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t columns = grad.size(-1);
  const int64_t rows = columns == 0 ? 0 : grad.numel() / columns;
  if (columns == 0) return;
  if (rows == 0) {
    args.grad_bias->zero_();
    return;
  }
  const uint32_t threshold = drop_threshold(args.p);
  const auto stream = at::cuda::getCurrentCUDAStream();
  FD_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "bias_dropout_add_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t scale = keep_scale<acc_t>(args.p);
    const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = args.grad_x->mutable_data_ptr<scalar_t>();
    const bool vector = aligned16(gp) && aligned16(gxp) && columns % kElementsPerPhilox == 0;
    const int cols_per_unit = vector ? kElementsPerPhilox : 1;
    const BiasGradLayout layout(rows, columns, cols_per_unit);
    TORCH_CHECK(layout.blocks() < (int64_t{1} << 31), "fastdropout: tensor too large");
    at::Tensor partials = at::empty({layout.chunks, columns}, grad.options().dtype(acc_dtype));
    acc_t* pp = partials.mutable_data_ptr<acc_t>();
    const RngSource src = make_rng_source(*args.rng_state, nullptr, grad.device());
    const auto blocks = static_cast<unsigned>(layout.blocks());
    if (vector) {
      with_mask_index(args.shard, [&](const auto& index) {
        using Index = std::decay_t<decltype(index)>;
        bias_grad_partials_cuda_kernel<scalar_t, kElementsPerPhilox, true, Index>
            <<<blocks, kThreads, 0, stream>>>(gp, gxp, pp, layout, index, src, threshold, scale);
      });
    } else {
      // Misaligned or ragged rows: grad_x by the plain pass (coalesced, one Philox call per 8
      // elements), then its column sums in the same order (1.5x the bytes of one pass, instead
      // of one Philox call per element).
      const at::Tensor& grad_x = *args.grad_x;
      dropout_pass_cuda(
          DropoutPass{&grad, args.grad_x, args.rng_state, nullptr, args.p, 1, {}, args.shard});
      bias_grad_partials_cuda_kernel<scalar_t, 1, false, ContiguousIndex>
          <<<blocks, kThreads, 0, stream>>>(grad_x.const_data_ptr<scalar_t>(), nullptr, pp,
                                            layout, ContiguousIndex{}, src, threshold, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* gbp = args.grad_bias->mutable_data_ptr<scalar_t>();
    if (layout.chunks == 1) {
      bias_grad_store_cuda_kernel<scalar_t>
          <<<static_cast<unsigned>(ceil_div(columns, kThreads)), kThreads, 0, stream>>>(
              pp, columns, gbp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t column_blocks = ceil_div(columns, kWarp);
    at::Tensor next;
    for (int64_t n = layout.chunks; n > 1; n = ceil_div(n, kBiasGradFanIn)) {
      const int64_t runs = ceil_div(n, kBiasGradFanIn);
      TORCH_CHECK(column_blocks * runs < (int64_t{1} << 31), "fastdropout: tensor too large");
      const auto fan_blocks = static_cast<unsigned>(column_blocks * runs);
      if (runs == 1) {
        bias_grad_fan_in_cuda_kernel<scalar_t, true>
            <<<fan_blocks, kWarp * kBiasGradFanIn, 0, stream>>>(pp, n, columns, column_blocks,
                                                                nullptr, gbp);
      } else {
        next = at::empty({runs, columns}, partials.options());
        bias_grad_fan_in_cuda_kernel<scalar_t, false>
            <<<fan_blocks, kWarp * kBiasGradFanIn, 0, stream>>>(
                pp, n, columns, column_blocks, next.mutable_data_ptr<acc_t>(), nullptr);
        partials = next;
        pp = partials.mutable_data_ptr<acc_t>();
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace fastdropout
