"""What a driver may hand to Ray workers through `runtime_env`: non-secret settings, never credentials.

Ray writes `runtime_env={"env_vars": ...}` in plain text into its session logs (`runtime_env_agent.log`,
mode 0644), so credentials must reach workers another way: a local Ray started by `ray.init` in the driver
inherits the driver's environment; nodes started with `ray start` take them from their own environment
(instance roles, the node's environment, a Kubernetes secret: see docs/training.md).
"""

from __future__ import annotations

import os
import re

FORWARDED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "OMP_WAIT_POLICY")
FORWARDED_PREFIXES = ("SSJDN_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
# Any variable whose name looks like it holds a secret stays out, whatever its prefix (HF_TOKEN, ...).
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|SESSION|PRIVATE|(^|_)KEY($|_)|ACCESS_KEY|API_KEY|AUTH")


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.upper()))


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's non-secret settings (S3 endpoint and region, offline switches, this project's knobs)."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if (k in FORWARDED or k.startswith(FORWARDED_PREFIXES)) and not is_secret_name(k)
    }
