"""`python -m pipelines.serve --store URL`: the same command as `ssjdn serve`."""

import sys

from pipelines.command import module_main
from pipelines.serve import cli

if __name__ == "__main__":
    sys.exit(module_main(cli))
