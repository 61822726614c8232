"""`python -m pipelines.tile SOURCE DEST_URL ...` (e.g. as a `ray job submit` entrypoint): = `ssjdn tile`."""

import sys

from pipelines.command import module_main
from pipelines.tile import cli

sys.exit(module_main(cli))
