"""Speed and memory benchmarks, printed as ratios measured side by side in one run.

    python bench.py                 # every section
    python bench.py losses encoders # chosen sections

Timings are wall-clock medians; CUDA runs synchronise before reading the clock.
Speed goals live here, never as timed assertions in the tests.
"""
import argparse
import statistics
import time

import torch


def timeit(fn, warmup=2, iters=10):
    """Median seconds of `fn()` over `iters` calls after `warmup` calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Each section: name -> function printing its table. Sections are added above this line.
SECTIONS = {
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    for name in args.sections or SECTIONS:
        print(f"\n== {name} ==")
        SECTIONS[name]()


if __name__ == "__main__":
    main()
