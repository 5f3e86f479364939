"""Entrypoint for `make demo`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnilmm_ray.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
