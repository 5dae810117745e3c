#!/usr/bin/env bash
# The nightly bulk migration as a Cloud Scheduler job: every night at 02:00,
# launch the flex template over the whole prefix. Outputs already migrated
# with this spec are skipped without reading their inputs, so each night only
# the checkpoints written since the last run are migrated.
#
#   PROJECT=my-proj BUCKET=my-bucket INPUT='gs://lab/runs/*/checkpoints/*' \
#   OUTPUT=gs://lab-v2/runs SPEC=gs://lab/specs/v2.yaml \
#   SERVICE_ACCOUNT=scheduler@my-proj.iam.gserviceaccount.com deploy/schedule/cloud_scheduler.sh
set -euo pipefail
: "${PROJECT:?}" "${BUCKET:?}" "${INPUT:?}" "${OUTPUT:?}" "${SPEC:?}" "${SERVICE_ACCOUNT:?}"
REGION=${REGION:-us-central1}
cd "$(dirname "$0")/../.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TEMPLATE=gs://$BUCKET/templates/ckpt-surgery-gpu-$VERSION.json
IMAGE=${IMAGE:-$REGION-docker.pkg.dev/$PROJECT/ckpt-surgery/ckpt-surgery-gpu:$VERSION}

BODY=$(cat <<JSON
{"launchParameter": {
  "jobName": "ckpt-surgery-nightly",
  "containerSpecGcsPath": "$TEMPLATE",
  "parameters": {"input": "$INPUT", "output": "$OUTPUT", "spec": "$SPEC",
                 "sdk_container_image": "$IMAGE"},
  "environment": {"machineType": "g2-standard-8", "maxWorkers": 32,
                  "additionalExperiments": ["use_runner_v2", "no_use_multiple_sdk_containers"],
                  "serviceOptions": ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]}}}
JSON
)

gcloud scheduler jobs create http ckpt-surgery-nightly \
  --project "$PROJECT" --location "$REGION" --schedule "0 2 * * *" --time-zone UTC \
  --uri "https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
  --http-method POST --headers Content-Type=application/json --message-body "$BODY" \
  --oauth-service-account-email "$SERVICE_ACCOUNT" \
  --oauth-token-scope https://www.googleapis.com/auth/cloud-platform
