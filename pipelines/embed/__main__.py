"""`python -m pipelines.embed ARCHIVE STORE --checkpoint URL ...` (e.g. under `ray job submit`): = `ssjdn embed`."""

import sys

from pipelines.command import module_main
from pipelines.embed import cli

sys.exit(module_main(cli))
