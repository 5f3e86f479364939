"""Write the newest caption per image across sealed runs: `python jobs/latest.py --output URI --to FILE`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnilmm_ray.cli import latest_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(latest_main())
