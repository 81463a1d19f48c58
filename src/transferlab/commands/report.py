"""`transferlab-report <sweep folder>`: the sweep's table (mean ± std over seeds), CSVs and plots
(`analysis.sweep_report`)."""

import argparse
import sys
from pathlib import Path

from transferlab.analysis.sweep_report import collect, write
from transferlab.commands.common import script
from transferlab.core.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/<date_time>")
    parser.add_argument(
        "--metrics",
        nargs="+",
        help="metrics to tabulate and plot (keys of results.json); default: gain/acc and each <stage>/test/acc",
    )
    parser.add_argument(
        "--x",
        help="swept key on the plots' x axis (default data.target.samples_per_class "
        "when swept, else the first swept key); log scale when numeric and spanning >= 10x",
    )
    parser.add_argument("--line", help="swept key drawn as one line per value (default: the next swept key)")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.sweep_dir)
        paths = write(args.sweep_dir, rows, args.metrics, args.x, args.line)
    except UserError as err:
        print(f"transferlab-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        print(path)
    print((args.sweep_dir / "report.md").read_text())


def console_script() -> None:
    script(main)


if __name__ == "__main__":
    console_script()
