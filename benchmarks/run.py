"""Entry point of the benchmark harness: the same as `python -m ampclip bench` and `make bench`.

    python benchmarks/run.py                                    # the default set for this device
    python benchmarks/run.py --workloads gpt2-124m 2000x512 10000x4 --dtypes fp32 bf16 --reps 20
    python benchmarks/run.py --quick --out /tmp/bench           # a smoke run at tiny sizes
    python benchmarks/run.py --list                             # workloads and providers
"""

import sys

from ampclip.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
