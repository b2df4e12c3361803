#!/usr/bin/env bash
# The image-folder path end to end on a second real dataset the machine can get offline:
# scikit-learn's wheel ships 1,797 real 8x8 handwritten digits (sklearn/datasets/data/). They
# are written out as an image-folder tree (data/digits/<digit>/<n>.png; not committed), then
# wsa-fl runs a 20-client Dirichlet simulation on them through the MobileNetV2 backbone, with
# the centralized reference, into runs/digits/ (table.md, accuracy.png, models/).
# Extra arguments go to wsa-fl.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/fetch-model.sh
.venv-models/bin/pip install --quiet "scikit-learn==1.7.*"
.venv-models/bin/python - <<'PY'
from pathlib import Path
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

digits = load_digits()
root = Path("data/digits")
for n, (pixels, label) in enumerate(zip(digits.images, digits.target)):
    folder = root / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    # Values 0..16 (ink) scaled to 0..255, dark digits on white as MNIST-like scans are not:
    # kept as the data has them (ink bright), like MNIST.
    image = Image.fromarray((pixels * 255.0 / 16.0).round().astype(np.uint8), mode="L")
    image.save(folder / f"{n:04d}.png")
print(f"wrote {len(digits.target)} images in {len(set(digits.target))} classes to {root}")
PY
cargo build --release --locked -p wsa-fl
target/release/wsa-fl --dataset image-folder --data data/digits --test-fraction 0.2 \
  --train-limit 0 --test-limit 0 --clients 20 --per-round 10 --partition dirichlet --alpha 0.5 \
  --rounds 30 --strategies fedavg,wsa:100:mean-std --seeds 0,1,2 --out runs/digits "$@"
