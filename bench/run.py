#!/usr/bin/env python
"""Runs dsmoe's benchmark suites from a source checkout: `python bench/run.py quant gemm ...`.
Same as `dsmoe bench` (same options, errors and exit statuses); results go to bench/results/<device>/<suite>.json."""
import os
import sys

try:
    from dsmoe.__main__ import main
except ImportError:  # not installed: this checkout's package (its CPU references work without a build)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    from dsmoe.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
