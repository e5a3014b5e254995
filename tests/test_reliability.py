"""Concurrency and memory: no two concurrent calls share a (seed, offset), nothing leaks, no
mask is kept alive."""
import gc
import threading
import weakref

import torch

import fastdropout
from stats import assert_binomial


def test_threads_on_the_cpu_draw_distinct_masks():
    """Python threads calling dropout at once: each call takes its own seed under the CPU
    generator's lock, so no two of 8 x 50 masks coincide, and the outputs are consistent."""
    x = torch.ones(4096)
    results = [[] for _ in range(8)]

    def work(slot):
        for _ in range(50):
            y, rng = torch.ops.fastdropout.dropout(x, 0.5)
            results[slot].append((tuple(rng.tolist()), y))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states = [s for slot in results for s, _ in slot]
    assert len(states) == 400 and len(set(states)) == 400
    for slot in results:
        for (seed, offset), y in slot:
            mask = fastdropout.dropout_mask(4096, 0.5, seed=seed % 2**64, offset=offset % 2**64)
            assert torch.equal(y != 0, mask)
    # Two of them agree on about half the elements, as independent masks do.
    a, b = results[0][0][1] != 0, results[1][0][1] != 0
    assert_binomial(int((a == b).sum()), 4096, 0.5, "agreement across threads")


def test_threads_draw_exactly_one_value_each_from_the_generator():
    """N calls from several threads advance the CPU generator exactly as N sequential calls do
    (the same set of seeds), whatever the interleaving."""
    x = torch.ones(64)
    torch.manual_seed(42)
    sequential = {tuple(torch.ops.fastdropout.dropout(x, 0.5)[1].tolist()) for _ in range(200)}
    torch.manual_seed(42)
    seen, lock = set(), threading.Lock()

    def work():
        for _ in range(50):
            s = tuple(torch.ops.fastdropout.dropout(x, 0.5)[1].tolist())
            with lock:
                seen.add(s)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == sequential


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_a_million_small_calls_do_not_grow_memory():
    x = torch.randn(64, requires_grad=True)
    g = torch.ones(64)
    for _ in range(2000):  # warm-up: allocator caches, autograd graph pools
        fastdropout.dropout(x, 0.1).backward(g)
    gc.collect()
    before = _rss_kib()
    with torch.no_grad():
        for _ in range(1_000_000 - 20_000):
            fastdropout.dropout(x, 0.1)
    for _ in range(20_000):
        fastdropout.dropout(x, 0.1).backward(g)
    gc.collect()
    grown = _rss_kib() - before
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB over a million calls"


def test_no_mask_or_input_kept_alive_by_the_graph():
    """After forward, the graph holds only the 16-byte state: the input can be freed."""
    x = torch.randn(1 << 16, requires_grad=True)
    h = x * 2
    ref = weakref.ref(h)
    y = fastdropout.dropout(h, 0.5)
    del h
    gc.collect()
    assert ref() is None  # dropout's backward does not need its input
    y.sum().backward()
    assert x.grad is not None
