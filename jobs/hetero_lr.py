"""spark-submit entry point: one party of a vertical logistic regression job.

    spark-submit --master yarn jobs/hetero_lr.py --conf party.toml [--set section.key=value ...]
"""

import sys

from fedps.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:], "--set", 'job.algorithm="hetero_lr"']))
