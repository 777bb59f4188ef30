"""The `dsmoe` command line: `dsmoe info`, `dsmoe bench SUITE`, `dsmoe demo quant`, `dsmoe train`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # its own parser: `dsmoe train --help` lists the training options
        from .train import main as train_main

        return train_main(argv[1:])
    p = argparse.ArgumentParser(prog="dsmoe", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="version, build, torch, GPU, and which ops have CUDA kernels")
    pi.add_argument("--json", action="store_true")
    pb = sub.add_parser("bench", help="run benchmark suites on a GPU and write JSON under bench/results/<device>/")
    pb.add_argument("suites", nargs="*", default=["quant"], help="suites to run (see --list)")
    pb.add_argument("--list", action="store_true", help="list the suites")
    pb.add_argument("--out", default="bench/results", help="results root (default: bench/results)")
    pb.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    pd = sub.add_parser("demo", help="small demonstrations")
    pd.add_argument("what", choices=["quant"])
    pd.add_argument("--device", default=None)
    sub.add_parser("train", help="train a small DeepSeek-V3-style model on a synthetic task (`dsmoe train --help`)")
    args = p.parse_args(argv)

    if args.cmd == "info":
        from .info import main as info_main

        return info_main(args.json)
    if args.cmd == "bench":
        from .bench.runner import main as bench_main

        return bench_main(args.suites, out=args.out, quick=args.quick, list_only=args.list)
    if args.cmd == "demo":
        from .demo import quant_demo

        return quant_demo(args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
