"""spark-submit entry point: one party (or the coordinator) of a FedAvg job.

    spark-submit --master yarn jobs/fedavg.py --conf party.toml [--set section.key=value ...]

The coordinator needs no Spark: ``python jobs/fedavg.py --conf coordinator.toml`` (or ``fedps run``).
"""

import sys

from fedps.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:], "--set", 'job.algorithm="fedavg"']))
