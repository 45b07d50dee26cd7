"""``python -m pipelines.embed ...``: what ``ray job submit`` runs; the same as ``rayembed embed ...``.

The job itself is declared in pipelines/jobs/embed.py and run by pipelines/runner.py.
"""

from __future__ import annotations

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
