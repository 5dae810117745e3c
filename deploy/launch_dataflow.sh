#!/usr/bin/env bash
# Build the image and the flex template, then launch one migration on Dataflow.
#
#   PROJECT=my-proj BUCKET=my-bucket INPUT='gs://lab/runs/*/checkpoints/*' \
#   OUTPUT=gs://lab-v2/runs SPEC=gs://lab/specs/widen.yaml deploy/launch_dataflow.sh
#
# ACCELERATOR=gpu (default: one NVIDIA L4 per g2-standard-8 worker) or tpu
# (one TPU v5e chip per ct5lp-hightpu-1t worker; the image is built with
# jax[tpu]). BUILD=0 skips building when the image and template exist.
set -euo pipefail
: "${PROJECT:?}" "${BUCKET:?}" "${INPUT:?}" "${OUTPUT:?}" "${SPEC:?}"
REGION=${REGION:-us-central1}
ACCELERATOR=${ACCELERATOR:-gpu}
MAX_WORKERS=${MAX_WORKERS:-32}
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE=${IMAGE:-$REGION-docker.pkg.dev/$PROJECT/ckpt-surgery/ckpt-surgery-$ACCELERATOR:$VERSION}
TEMPLATE=gs://$BUCKET/templates/ckpt-surgery-$ACCELERATOR-$VERSION.json

case "$ACCELERATOR" in
  gpu) BUILD_ARGS=()
       MACHINE=${MACHINE:-g2-standard-8}
       SERVICE_OPTIONS="worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver" ;;
  tpu) BUILD_ARGS=(--build-arg BASE=ubuntu:24.04 --build-arg JAX_EXTRA=tpu)
       MACHINE=${MACHINE:-ct5lp-hightpu-1t}
       SERVICE_OPTIONS="worker_accelerator=type:tpu-v5-lite-podslice;topology:1x1" ;;
  *) echo "ACCELERATOR must be gpu or tpu" >&2; exit 2 ;;
esac

if [ "${BUILD:-1}" = 1 ]; then
  docker build -f deploy/Dockerfile "${BUILD_ARGS[@]}" -t "$IMAGE" .
  docker push "$IMAGE"
  gcloud dataflow flex-template build "$TEMPLATE" --project "$PROJECT" \
    --image "$IMAGE" --sdk-language PYTHON --metadata-file deploy/flex_template/metadata.json
fi

# Runner v2; one SDK process per worker VM, so one process owns the accelerator.
gcloud dataflow flex-template run "ckpt-surgery-$(date +%Y%m%d-%H%M%S)" \
  --project "$PROJECT" --region "$REGION" \
  --template-file-gcs-location "$TEMPLATE" \
  --worker-machine-type "$MACHINE" --max-workers "$MAX_WORKERS" \
  --additional-experiments use_runner_v2,no_use_multiple_sdk_containers \
  --parameters "^~^input=$INPUT~output=$OUTPUT~spec=$SPEC~sdk_container_image=$IMAGE~dataflow_service_options=$SERVICE_OPTIONS"
