"""Parameter server: sparse, high-dimensional model tables on Ray actor shards.

``ParameterServer`` (driver) starts the shards, ends steps and checkpoints;
``TableClient`` pulls and pushes batches of rows; ``TableRef`` carries a table
to Spark executors. ``ps`` depends on Ray and numpy (and pyarrow for
checkpoints) only.
"""

from fedps.ps.client import TableClient, TableRef, connect
from fedps.ps.config import InitConfig, OptimizerConfig, PSConfig, TableSpec
from fedps.ps.server import ParameterServer

__all__ = [
    "InitConfig",
    "OptimizerConfig",
    "PSConfig",
    "ParameterServer",
    "TableClient",
    "TableRef",
    "TableSpec",
    "connect",
]
