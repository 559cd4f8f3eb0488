"""Print ``FILE_SECONDS`` rows (tests/conftest.py) from a ``pytest --durations=0`` log.

Usage: ``python tests/file_seconds.py LOG`` (or ``-`` for stdin), where LOG holds the "slowest
durations" section of a full quiet run (``make test`` with ``--durations=0``).  A file's seconds are
its tests' setup + call + teardown summed; test files of this tree missing from the log (every
duration under pytest's 5 ms floor) print as 0.  Rows come largest first, ready to paste.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

#: ``12.34s call     tests/pt/test_x.py::test_y[param]``
_LINE = re.compile(r"^(\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(\S+?)::")


def file_seconds(lines) -> dict[str, float]:
    """Summed seconds per test file name (basename: the names are unique across tests/)."""
    total: dict[str, float] = collections.defaultdict(float)
    for line in lines:
        match = _LINE.match(line)
        if match:
            total[os.path.basename(match.group(2))] += float(match.group(1))
    return dict(total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="a pytest --durations=0 log, or - for stdin")
    args = parser.parse_args(argv)
    if args.log == "-":
        seconds = file_seconds(sys.stdin)
    else:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            seconds = file_seconds(f)
    here = os.path.dirname(os.path.abspath(__file__))
    for _, _, files in os.walk(here):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                seconds.setdefault(name, 0.0)
    for name, s in sorted(seconds.items(), key=lambda kv: (-round(kv[1]), kv[0])):
        sys.stdout.write(f'    "{name}": {round(s)},\n')
    sys.stdout.write(f"    # {len(seconds)} files, {sum(seconds.values()):.0f} s summed\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
