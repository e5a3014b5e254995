"""``python -m fastdropout.info [--json]``: prints what a bug report needs (fastdropout's and
torch's versions, what the extension was built against, its CUDA architectures, the CPU kernel
path and threads, the visible GPUs). The facts come from :func:`fastdropout.system_info`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .diagnostics import format_system_info, system_info


def main(argv: Optional[List[str]] = None) -> int:
    """Prints :func:`format_system_info` (or, with ``--json``, :func:`system_info` as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m fastdropout.info", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    args = parser.parse_args(argv)
    info = system_info()
    print(json.dumps(info, indent=2) if args.json else format_system_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
