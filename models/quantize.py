#!/usr/bin/env python3
"""Static int8 quantization of the features ONNX with onnxruntime's tooling (issue 19, part 3).

  quantize.py [--side 96] [--calibration 160] [--format qdq|qoperator]

Writes models/mobilenet_v2_features_int8.onnx: every Conv quantized with per-channel int8
weights and uint8 activations calibrated by min/max, in QDQ format by default (the float graph
with QuantizeLinear/DequantizeLinear pairs, which onnxruntime fuses into integer kernels and
tract runs as float convs on dequantized weights with quantized activations: about twice the
f32 time in tract 0.23.9, against 50x for the QOperator format's QLinearConv, see docs/benchmarks.md;
`--format qoperator` writes that one). Residual adds and the pooling stay float. Also writes
target/bench/int8_backbone.json with the features' agreement with the f32 model on the test
images, for this file and for the int8-weights one of models/convert.py. onnxruntime's
images/s for all three come from `verify.py --bench`, in one interleaved run.

Calibration uses natural photographs that ship inside the scikit-image wheel (astronaut, cat,
coffee, rocket, motorcycles, ...), never the test images: random crops and flips of them, resized
to the side and preprocessed exactly as verify.py does. The wheel is fetched by pip into
.cache/wheels and checked against its sha256; nothing is installed from it.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify import (  # noqa: E402
    FEATURES_ONNX, INT8_ONNX, INT8W_ONNX, ROOT, imagenet_files, load_rgb, preprocess, session,
    sha256,
)

OUT_JSON = ROOT / "target" / "bench" / "int8_backbone.json"
CACHE = ROOT / ".cache" / "wheels"
# A fixed platform so every host downloads the same file; only its PNG/JPEG members are read.
SKIMAGE_WHEEL = "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
SKIMAGE_SHA256 = "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af"
CALIBRATION_PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png",
    "grass.png", "gravel.png", "color.png", "camera.png", "coins.png", "moon.png", "page.png",
    "text.png", "clock_motion.png", "cell.png", "horse.png", "logo.png",
]
SEED = 20261201


def skimage_photos() -> list[Image.Image]:
    wheel = CACHE / SKIMAGE_WHEEL
    if not wheel.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
             "--python-version", "3.11", "scikit-image==0.26.0", "-d", str(CACHE)],
            check=True,
        )
    data = wheel.read_bytes()
    if (got := sha256(wheel)) != SKIMAGE_SHA256:
        sys.exit(f"quantize: {wheel} has sha256 {got}, expected {SKIMAGE_SHA256}")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [Image.open(io.BytesIO(z.read(f"skimage/data/{n}"))).convert("RGB")
                for n in CALIBRATION_PHOTOS]


def calibration_inputs(side: int, count: int) -> list[np.ndarray]:
    """Random square crops (40-100% of the short side) with random flips, resized to `side`."""
    rng = np.random.default_rng(SEED)
    photos = skimage_photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        crop = int(min(w, h) * rng.uniform(0.4, 1.0))
        x, y = rng.integers(0, w - crop + 1), rng.integers(0, h - crop + 1)
        img = photo.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(preprocess(np.asarray(img, dtype=np.uint8))[None])
    return out


class Reader(CalibrationDataReader):
    def __init__(self, inputs: list[np.ndarray], name: str):
        self.items = iter([{name: x} for x in inputs])

    def get_next(self):
        return next(self.items, None)


def agreement(path: Path, side: int) -> dict:
    """Features of the 20 test images from the f32 file and `path`, compared row by row."""
    f32, int8 = session(FEATURES_ONNX, 1), session(path, 1)
    name = f32.get_inputs()[0].name
    a, b = [], []
    for path, _ in imagenet_files():
        x = preprocess(load_rgb(path, side))[None]
        a.append(f32.run(None, {name: x})[0][0])
        b.append(int8.run(None, {name: x})[0][0])
    a, b = np.array(a), np.array(b)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    return {"side": side, "images": len(a), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()), "relative_l2_mean": float(rel.mean()),
            "relative_l2_max": float(rel.max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=96, help="calibration input side")
    ap.add_argument("--calibration", type=int, default=160, help="calibration inputs")
    ap.add_argument("--format", choices=["qdq", "qoperator"], default="qdq")
    args = ap.parse_args()
    name = session(FEATURES_ONNX, 1).get_inputs()[0].name
    inputs = calibration_inputs(args.side, args.calibration)
    quantize_static(
        str(FEATURES_ONNX), str(INT8_ONNX), Reader(inputs, name),
        quant_format=QuantFormat.QDQ if args.format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=["Conv"], per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    # The quantizer records intermediate shapes with a symbolic batch; tract binds the batch
    # to 1 at load and refuses to unify the two, and infers every shape itself anyway.
    model = onnx.load(str(INT8_ONNX))
    del model.graph.value_info[:]
    onnx.save(model, str(INT8_ONNX))
    print(f"wrote {INT8_ONNX} ({INT8_ONNX.stat().st_size:,} B, sha256 {sha256(INT8_ONNX)})")
    # Beside it, the int8-weights file that models/convert.py writes (scripts/fetch-model.sh).
    files = {"f32": FEATURES_ONNX, "int8": INT8_ONNX, "int8w": INT8W_ONNX}
    report = {"bench": "int8_backbone", "int8_sha256": sha256(INT8_ONNX),
              "calibration": {
        "photos": CALIBRATION_PHOTOS, "wheel": SKIMAGE_WHEEL, "inputs": args.calibration,
        "side": args.side, "method": "MinMax", "seed": SEED}, "format": args.format,
        "sizes_bytes": {k: p.stat().st_size for k, p in files.items()},
        "agreement": {k: [agreement(files[k], s) for s in (96, 224)] for k in ("int8", "int8w")}}
    for k, rows in report["agreement"].items():
        for a in rows:
            print(f"{k} features at {a['side']}²: cosine min {a['cosine_min']:.4f} mean "
                  f"{a['cosine_mean']:.4f}, relative L2 mean {a['relative_l2_mean']:.4f} "
                  f"max {a['relative_l2_max']:.4f}")
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
