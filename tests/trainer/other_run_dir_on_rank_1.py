"""``python other_run_dir_on_rank_1.py ARGS``: the ``threetowers`` command, where rank 1 reads
``$RUN_DIR_OF_RANK_1`` as its ``--run-dir``: a node that does not see the others' folder."""

from __future__ import annotations

import os
import sys

from threetowers.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        args[args.index("--run-dir") + 1] = os.environ["RUN_DIR_OF_RANK_1"]
    sys.exit(main(args))
