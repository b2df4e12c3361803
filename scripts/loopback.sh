#!/usr/bin/env bash
# The README's "Running a federation over QUIC" steps as written, on one machine: an
# aggregator and four devices in their own folders under a temporary directory, with
# AGG=127.0.0.1. Prints the metrics and a device's status mid-run, the last round lines, the
# status at the end, a prediction and both exports. Needs the release binaries, the model and
# Fashion-MNIST (scripts/main.sh or scripts/test.sh fetch them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/agg" && cd "$work/agg" && ln -s "$root/target" target

# 1. The aggregator host.
AGG=127.0.0.1
target/release/aggregator gen-certs --out creds --clients 4 --server-names "$AGG"
target/release/aggregator print-config > run.toml
target/release/aggregator serve --config run.toml --creds creds --listen 0.0.0.0:4433 \
    --metrics 127.0.0.1:9100 > serve.log 2>&1 &
serve=$!

# 2. Each device's files.
for K in 0 1 2 3; do
  mkdir -p "$work/dev$K"
  cp creds/ca.pem "creds/clients/client-000$K.token" "$work/dev$K/"
  ln -s "$root/models" "$work/dev$K/models"
  ln -s "$root/data" "$work/dev$K/data"
done
export PATH="$root/target/release:$PATH"

# 3. The devices.
for K in 0 1 2 3; do
  cd "$work/dev$K"
cat > client.toml <<EOF
server = "$AGG:4433"
ca_cert = "ca.pem"
client_id = "client-000$K"
token_file = "client-000$K.token"
data = "data/fashion-mnist"     # your images: a class_name/*.png|jpg tree
data_format = "fashion-mnist"   # image-folder for such a tree
limit = 500
report = "report.json"
EOF
  edge-client join --config client.toml > join.log 2>&1 &
done

# 4. Watching, once two rounds have closed.
until curl -s 127.0.0.1:9100/metrics | grep -q 'wsa_rounds_closed_total{outcome="counted"} [2-9]'; do
  sleep 0.1
done
echo "== metrics (mid-run)"
curl -s 127.0.0.1:9100/metrics | grep '^wsa_' | grep -v _bucket
echo "== status (mid-run)"
(cd "$work/dev0" && edge-client status --config client.toml)
wait "$serve"
wait
echo "== aggregator log (last lines)"
tail -3 "$work/agg/serve.log" | sed 's/\x1b\[[0-9;]*m//g'
echo "== status (end)"
cd "$work/dev0"
edge-client status --config client.toml

# 5. The model.
image=$(ls "$root"/runs/fleet/showcase/*.png 2>/dev/null | head -1 || true)
if [ -n "$image" ]; then
  echo "== predict"
  edge-client predict --model model "$image" 2>/dev/null
fi
echo "== export"
edge-client export --model model --out model.onnx 2>/dev/null
edge-client export --model model --format nnef --out model.nnef.tgz 2>/dev/null
