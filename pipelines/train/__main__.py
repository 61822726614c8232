"""`python -m pipelines.train ...` (= `ssjdn train`; the entrypoint of `ray job submit` and the KubeRay RayJob)."""

import sys

from pipelines.train.cli import main

sys.exit(main())
