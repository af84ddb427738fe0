"""spark-submit entry point: one party of a SecureBoost (vertical gradient-boosted trees) job.

    spark-submit --master yarn jobs/secureboost.py --conf party.toml [--set section.key=value ...]
"""

import sys

from fedps.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:], "--set", 'job.algorithm="secureboost"']))
