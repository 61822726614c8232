"""`python -m pipelines.shard DATASET DEST_URL ...` (e.g. as a `ray job submit` entrypoint): = `ssjdn shard`."""

import sys

from pipelines.command import module_main
from pipelines.shard import cli

sys.exit(module_main(cli))
