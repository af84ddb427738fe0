"""spark-submit entry point for one party of any fedps job.

    spark-submit --master yarn jobs/party.py --conf party.toml [--set section.key=value ...]
"""

import sys

from fedps.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
