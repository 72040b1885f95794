"""What every script does around its work: logging setup and one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


def run_script(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
               log_level: int = logging.INFO) -> int:
    """Call ``run(args)``; bad input (ValueError, and OSError: FileNotFoundError, download and I/O
    failures) becomes one ``error: ...`` line on stderr and exit status 1, without a traceback."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
