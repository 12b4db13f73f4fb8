"""Entry point of the benchmark harness (the same as `python -m ampclip bench` and `make bench`).

    python benchmarks/run.py --workloads gpt2-124m 2000x512 10000x4 --reps 20
"""

import sys

from ampclip.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
