"""The `dsmoe` command line: `dsmoe info`, `dsmoe bench SUITE`, `dsmoe demo quant`, `dsmoe train`,
`dsmoe generate`, `dsmoe serve`, `dsmoe rl`.

A user error (a bad value, an unusable --out or --device, no GPU for `bench`) is one line on stderr and
exit status 2 (wrong argument) or 1 (this machine cannot do it), and nothing is written."""
from __future__ import annotations

import argparse
import sys

from ._cli import ArgumentParser, run


class _Version(argparse.Action):
    # argparse's action="version" wants the string when the parser is built; the metadata lookup waits
    # until `--version` is given
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .info import package_version

        print(f"dsmoe {package_version()}")
        parser.exit(0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # its own parser: `dsmoe train --help` lists the training options
        from .train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "generate":  # its own parser too: `dsmoe generate --help`
        from .serve.cli import main as generate_main

        return generate_main(argv[1:])
    if argv and argv[0] == "rl":  # its own parser: `dsmoe rl --help`
        from .rl.demo import main as rl_main

        return rl_main(argv[1:])
    if argv and argv[0] == "serve":  # its own parser: `dsmoe serve --help`
        try:
            from .serve.server import main as serve_main
        except ImportError as e:
            print(f"dsmoe serve: needs the serve extra (pip install 'dsmoe[serve]'): {e}", file=sys.stderr)
            return 1
        return serve_main(argv[1:])
    p = ArgumentParser(prog="dsmoe", description=__doc__)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="version, build, torch, GPU, and which ops have CUDA kernels")
    pi.add_argument("--json", action="store_true")
    pb = sub.add_parser("bench", help="run benchmark suites on a GPU and write JSON under bench/results/<device>/")
    pb.add_argument("suites", nargs="*", default=["quant"], help="suites to run, or 'all' (see --list)")
    pb.add_argument("--list", action="store_true", help="list the suites and whether each one imports")
    pb.add_argument("--out", default="bench/results", help="results root (default: bench/results)")
    pb.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    pd = sub.add_parser("demo", help="small demonstrations")
    pd.add_argument("what", choices=["quant"])
    pd.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a usable GPU, else cpu)")
    sub.add_parser("train", help="train a small DeepSeek-V3-style model on a synthetic task (`dsmoe train --help`)")
    sub.add_parser("generate", help="complete prompts from a checkpoint with dsmoe.serve (`dsmoe generate --help`)")
    sub.add_parser("rl", help="GRPO reinforcement learning on a small model with a verifiable reward (`dsmoe rl --help`)")
    sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a checkpoint (`dsmoe serve --help`)")
    args = p.parse_args(argv)

    if args.cmd == "info":
        from .info import main as info_main

        return info_main(args.json)
    if args.cmd == "bench":
        from .bench.runner import main as bench_main

        return run("dsmoe bench", bench_main, args.suites, out=args.out, quick=args.quick, list_only=args.list)
    if args.cmd == "demo":
        from .demo import quant_demo

        return run("dsmoe demo", quant_demo, args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
