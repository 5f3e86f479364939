"""Write the newest caption per image across sealed runs: `python jobs/latest.py --output URI --to FILE`,
the same as `omnilmm-caption latest ...` (which the container image, holding only the package, runs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnilmm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["latest", *sys.argv[1:]]))
