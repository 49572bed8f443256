#!/usr/bin/env bash
# Run an archive-vision Beam job (ingest or score) on Google Cloud Dataflow.
#
#   PROJECT=my-project REGION=europe-west4 BUCKET=my-bucket \
#   IMAGE=europe-docker.pkg.dev/my-project/archive-vision/archive-vision:0.1.0 \
#     infra/dataflow/launch.sh ingest --input gs://my-bucket/scans --output gs://my-bucket/ingested --labels folders
#
# Everything after the job name is the job's own flags; this script adds the Dataflow options.
# Environment:
#   PROJECT, REGION, BUCKET  required; temp/staging files go to gs://$BUCKET/dataflow/{temp,staging}
#   IMAGE          the pipeline image (infra/docker/Dockerfile), pushed where the workers can pull it; when
#                  empty, workers pip-install the project from --setup_file instead (slower start, needs PyPI)
#   MACHINE_TYPE   worker type (default n2-standard-4); image decoding is CPU-bound, no GPU needed
#   NUM_WORKERS / MAX_WORKERS   autoscaling range (THROUGHPUT_BASED), default 2 / 50
#   SERVICE_ACCOUNT  worker service account email (roles/dataflow.worker + bucket access)
#   NETWORK / SUBNETWORK  optional VPC placement; USE_PUBLIC_IPS=false keeps workers private
#   DRY_RUN=1      print the command (shell-quoted) instead of running it
set -euo pipefail

job="${1:?usage: launch.sh ingest|score [job flags...]}"
shift
case "$job" in
  ingest|score) ;;
  *) echo "launch.sh: unknown job '$job' (ingest or score)" >&2; exit 2 ;;
esac

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

cmd=(archive-vision "$job" "$@"
  --runner DataflowRunner
  --project "$PROJECT"
  --region "$REGION"
  --temp_location "gs://$BUCKET/dataflow/temp"
  --staging_location "gs://$BUCKET/dataflow/staging"
  --job_name "archive-vision-$job-$(date -u +%Y%m%d-%H%M%S)"
  --machine_type "${MACHINE_TYPE:-n2-standard-4}"
  --autoscaling_algorithm THROUGHPUT_BASED
  --num_workers "${NUM_WORKERS:-2}"
  --max_num_workers "${MAX_WORKERS:-50}"
  --disk_size_gb "${DISK_SIZE_GB:-50}"
)
if [[ -n "${IMAGE:-}" ]]; then
  # The image already holds the SDK and the project: nothing to stage or install on the workers.
  cmd+=(--sdk_container_image "$IMAGE" --sdk_location container)
else
  cmd+=(--setup_file "$repo_root/setup.py")
fi
[[ -n "${SERVICE_ACCOUNT:-}" ]] && cmd+=(--service_account_email "$SERVICE_ACCOUNT")
[[ -n "${NETWORK:-}" ]] && cmd+=(--network "$NETWORK")
[[ -n "${SUBNETWORK:-}" ]] && cmd+=(--subnetwork "$SUBNETWORK")
[[ "${USE_PUBLIC_IPS:-true}" == "false" ]] && cmd+=(--no_use_public_ips)

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
