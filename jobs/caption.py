"""Entrypoint: `python jobs/caption.py --input URI --output URI [...]`, locally or via `ray job submit`."""

import os
import sys

# Under `ray job submit --working-dir .` the package is in the working dir, not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnilmm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
