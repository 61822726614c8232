#!/usr/bin/env bash
# Prefect side of ssjdn-pipeline: the process work pool that every deployment in prefect.yaml uses,
# the deployments themselves, and (optionally) a worker. Idempotent: run it again after editing prefect.yaml.
#
#   PREFECT_API_URL=http://prefect:4200/api infra/prefect/setup-work-pool.sh            # pool + deployments
#   PREFECT_API_URL=... START_WORKER=1 infra/prefect/setup-work-pool.sh                  # ... and a worker
#
# The worker must run where this project is installed (the Docker image of infra/Dockerfile, or the venv),
# with the storage credentials in its environment (AWS_*), and RAY_AUTH_TOKEN[_PATH] + RAY_AUTH_MODE=token
# when the flows submit Ray jobs to a cluster with token authentication.
set -euo pipefail

POOL="${SSJDN_WORK_POOL:-ssjdn-process}"   # must match work_pools.ssjdn_process.name in prefect.yaml
PREFECT="${PREFECT:-prefect}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEPLOY="${DEPLOY:-1}"

if "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
  echo "work pool $POOL already exists"
else
  "$PREFECT" work-pool create "$POOL" --type process
fi

if [ "$DEPLOY" = "1" ]; then
  (cd "$REPO" && "$PREFECT" --no-prompt deploy --all)
fi

if [ "${START_WORKER:-0}" = "1" ]; then
  exec "$PREFECT" worker start --pool "$POOL" --type process
fi
