#!/usr/bin/env python3
"""Check the converted MobileNetV2 with onnxruntime and write reference data for the Rust tests.

  verify.py           (a) classify foolbox's 20 ImageNet samples with mobilenet_v2_classifier.onnx;
                          exit 1 unless top-5 >= 19/20 and top-1 >= 17/20;
                      (b) write models/testdata/reference/ (inputs + onnxruntime features at
                          96x96 and 224x224, format below).
  verify.py --bench   onnxruntime images/s of mobilenet_v2_features.onnx at 96x96 and 224x224,
                      batch 1, intra_op_num_threads 1 and 2, preprocessing excluded, median of
                      repeats -> target/bench/ort_backbone.json; also of the int8-weights file
                      and of quantize.py's static int8 file when it exists, interleaved with
                      the f32 runs. Runs only the benchmark.

Preprocessing (as the Rust side must do it): RGB, /255, minus mean (0.485,0.456,0.406), divided
by std (0.229,0.224,0.225), NCHW float32. For classification every image is resized (PIL bilinear,
antialiased) to 224x224 as a whole, without cropping.

Reference format (models/testdata/reference/index.json describes each file): every data file is a
headerless little-endian array in C order; `dtype` is "f32" (IEEE float32) or "u8"; `shape`
gives its dimensions. Per input size S there are three files:
  input_S.f32     [3,3,S,S]  preprocessed NCHW batch: 2 foolbox images, 1 seeded N(0,1) tensor
  features_S.f32  [3,1280]   onnxruntime output `features` for that batch (batch of 3, 1 thread)
  features_int8w_S.f32 [3,1280] the same from mobilenet_v2_features_int8w.onnx (int8 weights)
  rgb_S.u8        [2,S,S,3]  the two resized images as RGB bytes (HWC), before normalisation
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FEATURES_ONNX = MODELS / "mobilenet_v2_features.onnx"
INT8W_ONNX = MODELS / "mobilenet_v2_features_int8w.onnx"
INT8_ONNX = MODELS / "mobilenet_v2_features_int8.onnx"  # models/quantize.py, not fetched
CLASSIFIER_ONNX = MODELS / "mobilenet_v2_classifier.onnx"
IMAGES = MODELS / "testdata" / "imagenet"
REFERENCE = MODELS / "testdata" / "reference"
BENCH_OUT = ROOT / "target" / "bench" / "ort_backbone.json"

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
REFERENCE_IMAGES = ["imagenet_00_243.jpg", "imagenet_01_559.jpg"]
REFERENCE_SEED = 20261126
REFERENCE_SIZES = [96, 224]
MIN_TOP1, MIN_TOP5 = 17, 19


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def load_rgb(path: Path, size: int) -> np.ndarray:
    """The whole image resized to size x size (PIL bilinear), as uint8 HWC RGB."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def resize_bilinear_no_aa(rgb: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear, no antialiasing (torch interpolate(mode="bilinear",
    align_corners=False)), uint8 HWC -> float32 HWC in [0,255], not rounded."""
    def taps(src: int):
        s = np.maximum((np.arange(size) + 0.5) * (src / size) - 0.5, 0.0)
        i0 = np.minimum(np.floor(s).astype(np.int64), src - 1)
        return i0, np.minimum(i0 + 1, src - 1), (s - i0).astype(np.float32)
    y0, y1, fy = taps(rgb.shape[0])
    x0, x1, fx = taps(rgb.shape[1])
    p = rgb.astype(np.float32)
    top = p[y0][:, x0] + fx[None, :, None] * (p[y0][:, x1] - p[y0][:, x0])
    bottom = p[y1][:, x0] + fx[None, :, None] * (p[y1][:, x1] - p[y1][:, x0])
    return top + fy[:, None, None] * (bottom - top)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 [...,H,W,3] -> float32 [...,3,H,W], normalised."""
    x = (rgb.astype(np.float32) / np.float32(255.0) - MEAN) / STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3), dtype=np.float32)


def imagenet_files() -> list[tuple[Path, int]]:
    files = sorted(IMAGES.glob("imagenet_*_*.jpg"))
    if len(files) != 20:
        sys.exit(f"verify: expected 20 images in {IMAGES}, found {len(files)}; "
                 "run scripts/fetch-model.sh")
    # foolbox names them imagenet_<index>_<ImageNet class id>.jpg
    return [(f, int(f.stem.split("_")[-1])) for f in files]


def classify() -> bool:
    sess = session(CLASSIFIER_ONNX, 2)
    feats = session(FEATURES_ONNX, 2)
    files = imagenet_files()
    x = preprocess(np.stack([load_rgb(f, 224) for f, _ in files]))
    logits = sess.run(["logits"], {"input": x})[0]
    top1 = top5 = 0
    for (f, label), row in zip(files, logits):
        order = np.argsort(-row)
        hit1, hit5 = bool(order[0] == label), bool(label in order[:5])
        top1 += hit1
        top5 += hit5
        print(f"  {f.name:24s} label {label:4d}  pred {order[0]:4d}  "
              f"{'top1' if hit1 else ('top5' if hit5 else 'miss')}  top5 {order[:5].tolist()}")
    print(f"verify: top-1 {top1}/20, top-5 {top5}/20 (224x224, whole image resized)")
    # Same images, torchvision's eval transform (shorter side 256, centre crop 224), for reference.
    crops = []
    for f, _ in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
            left, top = (im.width - 224) // 2, (im.height - 224) // 2
            crops.append(np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.uint8))
    def counts(batch: np.ndarray) -> str:
        lc = sess.run(["logits"], {"input": batch})[0]
        c1 = sum(int(np.argmax(r) == l) for (_, l), r in zip(files, lc))
        c5 = sum(int(l in np.argsort(-r)[:5]) for (_, l), r in zip(files, lc))
        return f"top-1 {c1}/20, top-5 {c5}/20"
    print(f"verify: (info) resize-256 + centre-crop-224: {counts(preprocess(np.stack(crops)))}")
    # Bilinear without antialiasing, as a plain Rust resize does it (edge-client preprocess.rs).
    plain = []
    for f, _ in files:
        with Image.open(f) as im:
            plain.append(resize_bilinear_no_aa(np.asarray(im.convert("RGB")), 224))
    print(f"verify: (info) whole image, bilinear without antialiasing: "
          f"{counts(preprocess(np.stack(plain)))}")
    # The two files share their backbone: logits must be the Linear layer applied to features.
    fv = feats.run(["features"], {"input": x})[0]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(CLASSIFIER_ONNX)).graph.initializer}
    lin = fv.astype(np.float64) @ inits["classifier.1.weight"].T.astype(np.float64) + inits["classifier.1.bias"]
    d = float(np.max(np.abs(lin - logits)))
    print(f"verify: features model vs classifier model, max |logits diff| {d:.2e}")
    ok = top1 >= MIN_TOP1 and top5 >= MIN_TOP5 and d < 1e-3
    if not ok:
        print(f"verify: FAILED (need top-1 >= {MIN_TOP1}, top-5 >= {MIN_TOP5})", file=sys.stderr)
    return ok


def write_array(path: Path, arr: np.ndarray, dtype: str) -> dict:
    np_dtype = {"f32": "<f4", "u8": "u1"}[dtype]
    arr = np.ascontiguousarray(arr, dtype=np_dtype)
    path.write_bytes(arr.tobytes(order="C"))
    return {"file": path.name, "dtype": dtype, "shape": list(arr.shape)}


def write_reference() -> None:
    REFERENCE.mkdir(parents=True, exist_ok=True)
    sess = session(FEATURES_ONNX, 1)
    int8w = session(INT8W_ONNX, 1)
    cases = []
    for size in REFERENCE_SIZES:
        rgb = np.stack([load_rgb(IMAGES / name, size) for name in REFERENCE_IMAGES])
        rng = np.random.default_rng(REFERENCE_SEED + size)
        noise = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        x = np.concatenate([preprocess(rgb), noise])
        feats = sess.run(["features"], {"input": x})[0]
        feats_int8w = int8w.run(["features"], {"input": x})[0]
        # Batch of 3 vs one at a time: how far onnxruntime itself moves with batch size.
        single = np.concatenate([sess.run(["features"], {"input": x[i:i + 1]})[0] for i in range(3)])
        cases.append({
            "size": size,
            "items": [{"kind": "image", "source": n} for n in REFERENCE_IMAGES]
                     + [{"kind": "random_normal", "seed": REFERENCE_SEED + size,
                         "generator": "numpy.random.default_rng(seed).standard_normal"}],
            "input": write_array(REFERENCE / f"input_{size}.f32", x, "f32"),
            "features": write_array(REFERENCE / f"features_{size}.f32", feats, "f32"),
            "features_int8w": write_array(REFERENCE / f"features_int8w_{size}.f32", feats_int8w,
                                          "f32"),
            "rgb": write_array(REFERENCE / f"rgb_{size}.u8", rgb, "u8"),
            "features_max_abs": float(np.max(np.abs(feats))),
            "ort_batch1_vs_batch3_max_abs_diff": float(np.max(np.abs(single - feats))),
        })
        print(f"verify: reference {size}x{size}: features max |x| {cases[-1]['features_max_abs']:.3f}, "
              f"batch-1 vs batch-3 max diff {cases[-1]['ort_batch1_vs_batch3_max_abs_diff']:.2e}")
    index = {
        "format": "headerless little-endian arrays, C order; dtype f32 = IEEE float32, u8 = bytes",
        "model": {"file": FEATURES_ONNX.name, "sha256": sha256(FEATURES_ONNX),
                  "input": "input", "output": "features"},
        "model_int8w": {"file": INT8W_ONNX.name, "sha256": sha256(INT8W_ONNX)},
        "preprocessing": {"resize": "PIL bilinear (antialiased), whole image to SxS",
                          "scale": "1/255", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "layout": "NCHW", "normalise": "(rgb/255 - mean) / std in float32"},
        "onnxruntime": ort.__version__,
        "intra_op_num_threads": 1,
        "cases": cases,
    }
    (REFERENCE / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    total = sum(p.stat().st_size for p in REFERENCE.iterdir())
    print(f"verify: wrote {REFERENCE} ({total} bytes)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine spent busy, CPU seconds this process used) so far."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(f) - f[3] - (f[4] if len(f) > 4 else 0)  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def bench(repeats: int, seconds: float) -> None:
    """Round-robin over the four configurations, so that load from other processes spreads
    over all of them rather than skewing one; each repeat also records how many CPUs other
    processes kept busy meanwhile, and `quiet_*` figures use only the repeats where that was
    under 0.25 CPU."""
    load_before = loadavg()
    models = {"f32": FEATURES_ONNX, "int8w": INT8W_ONNX}
    if INT8_ONNX.exists():
        models["int8"] = INT8_ONNX
    configs = []
    for (model, path), size in itertools.product(models.items(), (96, 224)):
        x = np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32)
        for threads in (1, 2):
            sess = session(path, threads)
            feed = {"input": x}
            # Warm up, and find how many runs fill about `seconds`.
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < max(0.3, seconds / 2) or n < 3:
                sess.run(["features"], feed)
                n += 1
            runs = max(3, int(seconds * n / (time.perf_counter() - t0)))
            configs.append({"model": model, "size": size, "threads": threads, "sess": sess,
                            "feed": feed,
                            "runs": runs, "rates": [], "other": []})
    for _ in range(repeats):
        for c in configs:
            sess, feed = c["sess"], c["feed"]
            b0 = busy_seconds()
            t0 = time.perf_counter()
            for _ in range(c["runs"]):
                sess.run(["features"], feed)
            wall = time.perf_counter() - t0
            b1 = busy_seconds()
            c["rates"].append(c["runs"] / wall)
            # CPUs kept busy by other processes meanwhile (0 = quiet machine).
            c["other"].append(max(0.0, ((b1[0] - b0[0]) - (b1[1] - b0[1])) / wall)
                              if b0 and b1 else float("nan"))
    results = []
    for c in configs:
        rates, other = c["rates"], c["other"]
        med = statistics.median(rates)
        quiet = [r for r, o in zip(rates, other) if o < 0.25]
        qmed = statistics.median(quiet) if quiet else None
        results.append({
            "model": c["model"], "size": c["size"], "threads": c["threads"], "batch": 1,
            "images_per_s": round(med, 2), "ms_per_image": round(1000.0 / med, 3),
            "runs_per_repeat": c["runs"], "repeats": repeats,
            "min_images_per_s": round(min(rates), 2), "max_images_per_s": round(max(rates), 2),
            "other_busy_cpus_median": round(statistics.median(other), 2),
            "quiet_repeats": len(quiet),
            "quiet_images_per_s": round(qmed, 2) if qmed else None,
        })
        print(f"bench: {c['model']:5s} {c['size']:3d}x{c['size']:<3d} threads {c['threads']}: {med:7.1f} images/s "
              f"({1000.0 / med:.2f} ms/image; range {min(rates):.1f}..{max(rates):.1f}; "
              f"others busy {statistics.median(other):.2f} CPUs; "
              f"quiet repeats {len(quiet)}/{repeats}" + (f" median {qmed:.1f})" if qmed else ")"))
    out = {
        "benchmark": "onnxruntime MobileNetV2 features, batch 1, preprocessing excluded",
        "models": {k: {"file": p.name, "sha256": sha256(p)} for k, p in models.items()},
        "onnxruntime": ort.__version__,
        "session": {"inter_op_num_threads": 1, "execution_mode": "sequential",
                    "graph_optimization_level": "all", "provider": "CPUExecutionProvider"},
        "statistic": "median over repeats of (runs / wall seconds); configurations interleaved",
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    # 1/5/15-minute load averages: other work on the machine skews the figures
                    "loadavg_before": load_before, "loadavg_after": loadavg()},
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    BENCH_OUT.parent.mkdir(parents=True, exist_ok=True)
    BENCH_OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"bench: wrote {BENCH_OUT}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", action="store_true", help="only run the onnxruntime benchmark")
    ap.add_argument("--repeats", type=int, default=7, help="bench repeats (median taken)")
    ap.add_argument("--seconds", type=float, default=1.0, help="bench seconds per repeat")
    args = ap.parse_args()
    for p in (FEATURES_ONNX, CLASSIFIER_ONNX, INT8W_ONNX):
        if not p.exists():
            sys.exit(f"verify: {p} missing; run scripts/fetch-model.sh")
    if args.bench:
        bench(args.repeats, args.seconds)
        return 0
    if not classify():
        return 1
    write_reference()
    return 0


if __name__ == "__main__":
    sys.exit(main())
