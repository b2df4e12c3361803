#!/usr/bin/env bash
# Benchmarks that write JSON under target/bench/ (see docs/benchmarks.md): the head's training
# epoch against GEMM, and the backbone in tract against onnxruntime on the same ONNX file, f32
# and its int8 quantization (run one after the other so they do not compete for the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/fetch-model.sh
# Writes models/mobilenet_v2_features_int8.onnx, which both benches below time too.
.venv-models/bin/python models/quantize.py
cargo bench --locked -p wsa --bench train_epoch
cargo bench --locked -p edge-client --bench backbone
.venv-models/bin/python models/verify.py --bench
.venv-models/bin/python - <<'PY'
import json
tract = json.load(open("target/bench/tract_backbone.json"))["rows"]
ort = {(r["model"], r["size"], r["threads"]): r["images_per_s"]
       for r in json.load(open("target/bench/ort_backbone.json"))["results"]}
print("| weights | side | threads | tract images/s | onnxruntime images/s | tract time / ort time |")
print("|---|---|---|---|---|---|")
for r in tract:
    o = ort[(r["model"], r["side"], r["threads"])]
    print(f"| {r['model']} | {r['side']} | {r['threads']} | {r['images_per_s']:.1f} | {o:.1f} "
          f"| {o / r['images_per_s']:.2f} |")
PY
# Wire: bytes and codec speed per update, the engine's CPU per update, round latency over QUIC.
cargo bench --locked -p protocol --bench codec
cargo bench --locked -p aggregator-core --bench engine
# The fold per backend and aggregation rule next to memcpy (add --features cuda on a GPU host).
cargo bench --locked -p aggregator --bench fold
cargo bench --locked -p wsa-fl --bench round_latency
