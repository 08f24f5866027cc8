"""The ``adalabel`` command: ``adalabel demo`` (the embedded digits comparison)."""

import sys
from typing import List, Optional

USAGE = """usage: adalabel <command> [options]

commands:
  demo      train a small CNN on scikit-learn's digits with every preset and print the comparison table
"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from lightning_adalabel.demo import main as demo_main

        return demo_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    print(f"adalabel: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
