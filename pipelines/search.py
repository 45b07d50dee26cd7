"""``python -m pipelines.search ...``: what ``ray job submit`` runs; the same as ``rayembed search ...``.

The job itself is declared in pipelines/jobs/search.py and run by pipelines/runner.py.
"""

from __future__ import annotations

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
