"""Write the newest caption per image across sealed runs: `python jobs/latest.py --output URI --to FILE`."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnilmm_ray.table import latest_to_parquet  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", required=True, help="the job's output table URI")
    ap.add_argument("--to", required=True, help="Parquet file (any fsspec URI) to write the latest view to")
    args = ap.parse_args()
    print(f"{latest_to_parquet(args.output, args.to)} rows -> {args.to}")
