// The CPU shard path against the unsharded one without Python, threads or allocation in the
// way: the kernels' own keep batches (csrc/cpu/keep_batches.h, keep_avx2.cpp) and element loops,
// timed in TSC cycles, unsharded and sharded passes alternating in one process. On this
// project's 2-core VMs a row of bench/sharded.py moves by several percent from run to run; these
// rows, in cache (n = 2^16), move by about 1%, so they are the instrument for changes of a few
// percent (bench/NOTES.md, "Third round").
//
// Build (x86-64, from the repository root, with the torch of the environment):
//   INC=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
//   LIB=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   g++ -O3 -ffp-contract=off -fno-trapping-math -std=c++20 $INC -Icsrc \
//       bench/keep_batches_cycles.cpp csrc/cpu/keep_avx2.cpp -L$LIB -lc10 -Wl,-rpath,$LIB \
//       -o /tmp/keep_batches_cycles
// Run: /tmp/keep_batches_cycles LOG2_NUMEL RUN_LENGTH RUN_START REPEATS [dropout|bias|keep]
//   e.g. /tmp/keep_batches_cycles 16 256 3 2001 dropout
// The shard is every other run of RUN_LENGTH elements of a (runs, 2 * RUN_LENGTH) tensor, from
// global column RUN_START (0: runs from multiples of 8; 3: from 8k + 3). "dropout" is the plain
// element loop, "bias" the bias_dropout_add one, "keep" only the keep bytes.
#include <x86intrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/keep_batches.h"

using namespace fastdropout;

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s LOG2_NUMEL RUN_LENGTH RUN_START REPEATS [dropout|bias|keep]\n",
                 argv[0]);
    return 2;
  }
  const int64_t n = int64_t{1} << std::atoi(argv[1]);
  const int64_t run_length = std::atoi(argv[2]);
  const int64_t run_start = std::atoi(argv[3]);
  const int repeats = std::atoi(argv[4]);
  const std::string loop = argc > 5 ? argv[5] : "dropout";
  std::vector<float> x(n), residual(n), out(n), bias(run_length);
  for (int64_t i = 0; i < n; ++i) x[i] = residual[i] = static_cast<float>(i % 1000) * 0.001f;
  const RngPair rng{1, 0};
  const uint32_t threshold = drop_threshold(0.1);
  const float scale = keep_scale<float>(0.1);
  RunMap map;
  map.run_length = run_length;
  map.base = run_start;
  map.levels = 1;
  map.counts[0] = n / run_length;
  map.strides[0] = 2 * run_length;
  volatile uint64_t sink = 0;
  auto body = [&](int64_t first, int64_t count, const uint8_t* keep) {
    if (loop == "keep") {
      sink = sink + keep[count - 1] + static_cast<uint64_t>(first);
    } else if (loop == "bias") {  // rows of run_length columns, as bias_dropout_add_forward_cpu
      for (int64_t column = first % run_length; count > 0; column = 0) {
        const int64_t m = std::min(count, run_length - column);
        for (int64_t k = 0; k < m; ++k) {
          out[first + k] = bias_dropout_add_element<true>(keep[k] != 0, x[first + k],
                                                          bias[column + k], residual[first + k],
                                                          scale);
        }
        first += m;
        keep += m;
        count -= m;
      }
    } else {
      for (int64_t k = 0; k < count; ++k) out[first + k] = apply_keep(keep[k] != 0, x[first + k], scale);
    }
  };
  auto cycles = [](auto&& pass) {
    const uint64_t t = __rdtsc();
    pass();
    return __rdtsc() - t;
  };
  std::vector<double> ratios;
  uint64_t best_unsharded = ~uint64_t{0}, best_sharded = ~uint64_t{0};
  for (int r = 0; r < repeats; ++r) {
    const uint64_t u = cycles([&] { cpu::for_keep_batches(rng, threshold, 0, n, body); });
    const uint64_t s = cycles([&] { cpu::for_local_keep_batches(rng, threshold, &map, 0, n, body); });
    best_unsharded = std::min(best_unsharded, u);
    best_sharded = std::min(best_sharded, s);
    ratios.push_back(static_cast<double>(s) / static_cast<double>(u));
  }
  std::sort(ratios.begin(), ratios.end());
  std::printf("%s n=2^%s runs of %lld from %lld: unsharded %.3f Mcycles, sharded %.3f, "
              "ratio of the fastest %.3f, median ratio %.3f\n",
              loop.c_str(), argv[1], static_cast<long long>(run_length),
              static_cast<long long>(run_start), best_unsharded / 1e6, best_sharded / 1e6,
              static_cast<double>(best_sharded) / static_cast<double>(best_unsharded),
              ratios[ratios.size() / 2]);
  return 0;
}
