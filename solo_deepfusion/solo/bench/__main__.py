"""``python -m solo_deepfusion.solo.bench``: the ``bench`` command, and the child process of
a cell run with ``--isolation subprocess`` (``--run-job <job.json>``)."""

import sys

from solo_deepfusion.solo.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
