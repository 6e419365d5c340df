"""python -m theria.boundary: probe every attention path on this torch build and device.

    python -m theria.boundary [--device cpu|cuda] [--dtype float64 bfloat16 ...]
                              [--json FILE] [--markdown FILE] [--no-compile]
                              [--only NAME ...] [--time-budget SECONDS]
                              [--update-contract docs/CONTRACT.md --section cpu|gpu]
                              [--from-json FILE]

Prints the Markdown report to stdout; --update-contract rewrites only the text between the
``<!-- boundary:SECTION:begin/end -->`` markers of that file. A run on another machine can be
saved with --json and turned into the report (or the contract section) here with --from-json:

    python -m theria.boundary --from-json boundary_cuda.json \
        --update-contract docs/CONTRACT.md --section gpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from theria.boundary import ProbeResult, builtin_paths, environment, run, to_json, to_markdown
from theria.boundary.report import from_json, update_contract

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m theria.boundary", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(_DTYPES),
        default=None,
        help="dtypes to probe (default: float64 on cpu; float32 bfloat16 on cuda)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the report here")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd paths")
    p.add_argument(
        "--update-contract",
        type=Path,
        default=None,
        metavar="FILE",
        help="rewrite the generated section of FILE (e.g. docs/CONTRACT.md)",
    )
    p.add_argument(
        "--section",
        choices=("cpu", "gpu"),
        default=None,
        help="which marked section --update-contract rewrites (default: from --device)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="probe only the built-in paths whose name contains one of these",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="paths not started within this many seconds are reported as not probed",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="render the reports from a saved --json FILE instead of probing (e.g. a GPU run)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no per-path progress on stderr")
    args = p.parse_args(argv)  # fmt: skip

    if args.from_json:
        results, env = from_json(args.from_json.read_text())
        device = torch.device(results[0].device if results else args.device)
        return _write(args, results, env, device)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    dtypes = [_DTYPES[d] for d in args.dtype] if args.dtype else None
    paths = builtin_paths()
    if args.only:
        paths = [x for x in paths if any(s in x.name for s in args.only)]
        if not paths:
            p.error(f"--only {args.only}: no built-in path matches; see theria.boundary.paths")
    results = run(
        device,
        dtypes,
        paths=paths,
        compile_paths=not args.no_compile,
        verbose=not args.quiet,
        time_budget=args.time_budget,
    )
    return _write(args, results, environment(str(device)), device)


def _write(
    args: argparse.Namespace, results: list[ProbeResult], env: dict[str, str], device: torch.device
) -> int:
    md = to_markdown(results, env)
    print(md)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(to_json(results, env) + "\n")
    if args.update_contract:
        section = args.section or ("gpu" if device.type == "cuda" else "cpu")
        update_contract(args.update_contract, section, to_markdown(results, env, heading="###"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
