#!/usr/bin/env python
"""Runs dsmoe's benchmark suites from a source checkout: `python bench/run.py quant gemm ...`.
Same as `dsmoe bench`; results go to bench/results/<device>/<suite>.json."""
import sys

from dsmoe.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
