#!/usr/bin/env python3
"""Row-by-row agreement of two feature caches of the same images (edge_client::cache layout),
e.g. the f32 and the int8 backbone's features of the Fashion-MNIST test set, as JSON:

  scripts/compare-features.py cache/fashion-mnist-test-96-10000-aff2468fdaca.feat \
      cache/fashion-mnist-test-96-10000-bcd2cfe69e60.feat [--out file.json]

(cache files end in the first 12 hex digits of their backbone's sha256)
"""

import argparse
import json
import sys

import numpy as np

HEADER = 136


def read(path: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    raw = open(path, "rb").read()
    if raw[:8] != b"WSAFEAT\0":
        sys.exit(f"{path}: not a feature cache")
    dim = int.from_bytes(raw[20:24], "little")
    count = int.from_bytes(raw[32:40], "little")
    labels = np.frombuffer(raw, "<u4", count, HEADER)
    features = np.frombuffer(raw, "<f4", count * dim, HEADER + 4 * count).reshape(count, dim)
    return labels, features, raw[72:104]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--out")
    args = ap.parse_args()
    la, a, source_a = read(args.reference)
    lb, b, source_b = read(args.other)
    if source_a != source_b or not np.array_equal(la, lb):
        sys.exit("the two caches were not built from the same images")
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(na, 1e-30)
    report = {
        "reference": args.reference, "other": args.other, "rows": len(a), "dim": a.shape[1],
        "cosine": {"min": cos.min(), "p01": np.quantile(cos, 0.01), "mean": cos.mean()},
        "relative_l2": {"mean": rel.mean(), "p99": np.quantile(rel, 0.99), "max": rel.max()},
    }
    report = json.loads(json.dumps(report, default=float))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
