"""What every ``jobs/<stage>.py`` does: run one ``selma`` command with the job's own arguments.

``ray job submit --working-dir . -- python jobs/<stage>.py --config sd2 --run-dir s3://b/run key=value``
ships the repository as the working directory; the selma package in it is imported ahead of any
installed copy, so a job runs the code it was submitted with. Inside a job ``RAY_ADDRESS`` is set,
so selma joins the cluster instead of starting a local Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(*command: str) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from selma.cli import main

    sys.exit(main([*command, *sys.argv[1:]]))
