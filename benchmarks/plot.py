"""Chart and docs tables from recorded results, without re-running anything.

    python benchmarks/plot.py benchmarks/results/<device>-<date>.json               # rewrites the .png
    python benchmarks/plot.py benchmarks/results/*.json --docs docs/benchmarks.md  # the markdown tables
"""

import argparse
import json
import sys
from pathlib import Path

from ampclip.benchmark import chart, write_docs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files written by the harness")
    parser.add_argument("--docs", default=None, help="also write the markdown tables here (- for stdout)")
    parser.add_argument("--no-png", action="store_true", help="do not (re)write the charts")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.results]
    if not args.no_png:
        for path in paths:
            png = chart(json.loads(path.read_text()), path.with_suffix(".png"))
            if png:
                print(f"wrote {png}")
    if args.docs:
        write_docs(paths, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
