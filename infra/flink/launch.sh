#!/usr/bin/env bash
# Run an archive-vision Beam job (ingest or score) on a Flink cluster through Beam's PortableRunner.
#
#   JOB_ENDPOINT=flink-jobserver:8099 infra/flink/launch.sh ingest --input gs://b/scans --output gs://b/ingested
#
# The Flink side: a Flink cluster, Beam's Flink job server next to it
#   docker run --net=host apache/beam_flink1.19_job_server:2.77.0 --flink-master=FLINK_MASTER:8081
# and an SDK harness where the Python code runs:
#   ENVIRONMENT_TYPE=EXTERNAL (default): a worker pool beside every task manager, e.g. a sidecar container
#     running the pipeline image with `--worker_pool` (it listens on localhost:50000);
#   ENVIRONMENT_TYPE=DOCKER: task managers start the pipeline image themselves (need a Docker daemon).
# The job server must see the same Beam version as the launcher (2.77).
# Environment:
#   JOB_ENDPOINT      job server host:port (default localhost:8099)
#   ENVIRONMENT_TYPE  EXTERNAL | DOCKER | LOOPBACK (LOOPBACK: workers call back into this launcher; tests only)
#   ENVIRONMENT_CONFIG  EXTERNAL: worker pool address (default localhost:50000); DOCKER: the image
#   PARALLELISM       Flink parallelism (default 8)
#   DRY_RUN=1         print the command (shell-quoted) instead of running it
set -euo pipefail

job="${1:?usage: launch.sh ingest|score [job flags...]}"
shift
case "$job" in
  ingest|score) ;;
  *) echo "launch.sh: unknown job '$job' (ingest or score)" >&2; exit 2 ;;
esac

env_type="${ENVIRONMENT_TYPE:-EXTERNAL}"
cmd=(archive-vision "$job" "$@"
  --runner PortableRunner
  --job_endpoint "${JOB_ENDPOINT:-localhost:8099}"
  --environment_type "$env_type"
  --parallelism "${PARALLELISM:-8}"
)
case "$env_type" in
  EXTERNAL) cmd+=(--environment_config "${ENVIRONMENT_CONFIG:-localhost:50000}") ;;
  DOCKER) cmd+=(--environment_config "${ENVIRONMENT_CONFIG:?set ENVIRONMENT_CONFIG to the pipeline image}") ;;
  LOOPBACK) ;;
  *) echo "launch.sh: ENVIRONMENT_TYPE must be EXTERNAL, DOCKER or LOOPBACK" >&2; exit 2 ;;
esac

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
