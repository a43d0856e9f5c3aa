"""``python -m benchmarks NAME [--quick] [--out DIR] [options]``; ``--list``; ``NAME --help`` for a benchmark's options."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from benchmarks import BENCHMARKS, load


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(prog="python -m benchmarks", add_help=False)
    first.add_argument("name", nargs="?", choices=list(BENCHMARKS))
    first.add_argument("--list", action="store_true")
    known, rest = first.parse_known_args(argv)
    if known.list or known.name is None:
        print("benchmarks (python -m benchmarks NAME [--quick] [--out DIR]; NAME --help for its options):\n")
        for name, (_, description) in BENCHMARKS.items():
            print(f"  {name:<20} {description}")
        return 0
    from benchmarks.harness import context, report

    module = load(known.name)
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {known.name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    context.add_common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser.add_argument_group(known.name))
    args = parser.parse_args(rest)
    if args.show:
        report.print_report(json.loads(args.show.read_text()))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(known.name, module, args, argv)


def run(name: str, module, args: argparse.Namespace, argv: list[str]) -> int:
    """Run one benchmark and write its report; 0 when every measured run succeeded."""
    import os

    from benchmarks.harness import context, report

    t0 = time.perf_counter()
    ctx = context.Context(name, args, argv)
    os.environ["OMP_NUM_THREADS"] = str(ctx.threads)
    import torch

    torch.set_num_threads(ctx.threads)
    env = report.environment(ctx.threads)
    path = ctx.out / f"{name}.json"
    ctx.checkpoint = lambda results: report.write_report(path, name, ctx, results, env, t0, partial=True)
    results = module.run(ctx)
    written = report.write_report(path, name, ctx, results, env, t0)
    report.print_report(written)
    print(f"report: {path}")
    return 0 if results.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
