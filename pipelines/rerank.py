"""``python -m pipelines.rerank ...``: what ``ray job submit`` runs; the same as ``rayembed rerank ...``.

The job itself is declared in pipelines/jobs/rerank.py and run by pipelines/runner.py.
"""

from __future__ import annotations

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["rerank", *sys.argv[1:]]))
