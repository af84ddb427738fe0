"""spark-submit entry point for one party's side of a private set intersection.

    spark-submit --master yarn --py-files fedps.zip jobs/psi.py \
        --conf conf/local/psi-guest.toml [--set job.params.protocol=rsa ...]

The configuration's ``job.algorithm`` must be ``psi``; see
``fedps/algorithms/psi/params.py`` for ``job.params``.
"""

from __future__ import annotations

import argparse
import sys

from fedps.engine.cli import main


def parse(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(prog="jobs/psi.py", description="one party of a PSI job")
    parser.add_argument("--conf", required=True, help="the party's TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration key (repeatable)")
    parser.add_argument("--role", help="this party's role; must agree with the file's party.role")
    args = parser.parse_args(argv)
    return ["run", "--conf", args.conf, "--set", "job.algorithm=psi",
            *[item for value in args.set for item in ("--set", value)],
            *(["--role", args.role] if args.role else [])]


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
