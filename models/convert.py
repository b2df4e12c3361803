#!/usr/bin/env python3
"""Convert torchvision's ImageNet MobileNetV2 checkpoint to ONNX files, without torch.

Input: `mobilenet_v2-b0353104.pth`, a LEGACY (non-zip) torch pickle holding a state dict.
It is read with a restricted unpickler that can build nothing but an OrderedDict, tensors
(`torch._utils._rebuild_tensor_v2`) and storage placeholders; every other global is refused,
so loading the file executes no code from it.

Outputs (opset 13, input `input` float32 [N,3,H,W], N/H/W dynamic):
  mobilenet_v2_features.onnx    -> `features` [N,1280] (after ReLU6, global average pool)
  mobilenet_v2_classifier.onnx  -> `logits`   [N,1000] (features + Linear(1280,1000))
  mobilenet_v2_features_int8w.onnx -> the features with int8 conv weights (below)

Every BatchNorm (eps 1e-5) is folded into the convolution before it (in float64, then cast to
float32); ReLU6 becomes Clip(0, 6). Needs numpy and onnx only.

int8 weights: each folded conv weight is stored as int8 with one float32 scale per output
channel (symmetric, max |w| / 127, round half to even) and a DequantizeLinear in front of its
Conv; biases and all arithmetic stay float32. The file is 27% of the f32 one, and a runtime
folds the DequantizeLinear into float weights at load, so it runs at the f32 speed: the
shipping size of int8 without int8 arithmetic (docs/benchmarks.md compares it with static
quantization, models/quantize.py).

Usage: convert.py CHECKPOINT.pth OUT_DIR
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
BN_EPS = 1e-5
OPSET = 13
FEATURE_DIM = 1280
NUM_CLASSES = 1000
# (expansion t, output channels c, repeats n, first stride s), torchvision width 1.0.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


# ---------------------------------------------------------------------------------------------
# Restricted reading of the legacy torch format
# ---------------------------------------------------------------------------------------------


class _StorageType:
    """Stand-in for torch.<X>Storage classes: only carries the numpy dtype."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in [
        ("FloatStorage", "<f4"),
        ("DoubleStorage", "<f8"),
        ("HalfStorage", "<f2"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
    ]
}


class _StorageRef:
    """A storage named in the pickle; its bytes come after the pickles in the file."""

    def __init__(self, key: str, stype: _StorageType, numel: int):
        self.key = key
        self.stype = stype
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """What `_rebuild_tensor_v2` returns here: a view description, materialised later."""

    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor built on something that is not a storage")
    for v in (storage_offset, *size, *stride):
        if not isinstance(v, int) or v < 0:
            raise pickle.UnpicklingError(f"bad tensor geometry {storage_offset} {size} {stride}")
    if backward_hooks:
        raise pickle.UnpicklingError("tensor with backward hooks")
    return _TensorRef(storage, storage_offset, size, stride)


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only OrderedDicts, tensors and storage placeholders; refuses every other global."""

    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
    }

    def __init__(self, f, storages: dict[str, _StorageRef] | None = None):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None

    def persistent_load(self, pid):
        if self.storages is None:
            raise pickle.UnpicklingError("persistent id outside the main object")
        # Legacy: ('storage', storage_type, root_key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"bad storage id {pid!r}")
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, stype, numel)
        elif ref.stype is not stype or ref.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} declared twice differently")
        return ref


def _load_one(f, storages=None):
    return RestrictedUnpickler(f, storages).load()


def _materialise(t: _TensorRef) -> np.ndarray:
    data = t.storage.data
    assert data is not None
    if t.size:
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride) if n > 0)
        if min(t.size) > 0 and last >= data.size:
            raise ValueError(f"tensor view runs past its storage {t.storage.key}")
    elif t.offset >= data.size:
        raise ValueError(f"scalar past its storage {t.storage.key}")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[t.offset:], shape=t.size, strides=tuple(s * item for s in t.stride), writeable=False
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="), copy=True)


def load_legacy_state_dict(path: Path) -> "collections.OrderedDict[str, np.ndarray]":
    raw = path.read_bytes()
    if raw[:2] == b"PK":
        raise ValueError(f"{path} is a zip-format checkpoint; only the legacy format is read")
    f = io.BytesIO(raw)
    magic = _load_one(f)
    if magic != LEGACY_MAGIC:
        raise ValueError(f"{path}: not a legacy torch file (magic {magic!r})")
    version = _load_one(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported protocol version {version!r}")
    sys_info = _load_one(f)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError(f"{path}: not written little-endian ({sys_info!r})")
    storages: dict[str, _StorageRef] = {}
    obj = _load_one(f, storages)
    keys = _load_one(f)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise ValueError("storage key list malformed")
    if set(keys) != set(storages):
        raise ValueError("storage key list does not match the storages the object uses")
    for key in keys:
        ref = storages[key]
        (count,) = struct.unpack("<q", f.read(8))
        if count != ref.numel:
            raise ValueError(f"storage {key}: {count} elements on disk, {ref.numel} declared")
        nbytes = count * ref.stype.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError(f"storage {key}: file truncated")
        ref.data = np.frombuffer(buf, dtype=ref.stype.dtype)
    if f.read(1):
        raise ValueError("trailing bytes after the last storage")
    if not isinstance(obj, collections.OrderedDict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, _TensorRef):
            raise ValueError(f"unexpected state dict entry {k!r}")
        out[k] = _materialise(v)
    return out


# ---------------------------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------------------------


class GraphBuilder:
    def __init__(self, sd: dict[str, np.ndarray], int8_weights: bool = False):
        self.sd = sd
        self.int8_weights = int8_weights
        self.used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counter = 0
        self.add_init("clip_min", np.array(0.0, dtype=np.float32))
        self.add_init("clip_max", np.array(6.0, dtype=np.float32))

    def take(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise KeyError(f"checkpoint has no {key}")
        self.used.add(key)
        return self.sd[key]

    def add_init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def conv_weight(self, name: str, w: np.ndarray) -> str:
        if not self.int8_weights:
            return self.add_init(name, w)
        scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
        self.nodes.append(helper.make_node(
            "DequantizeLinear",
            [self.add_init(f"{name}.int8", q), self.add_init(f"{name}.scale", scale)],
            [name], name=f"{name}.dequantize", axis=0,
        ))
        return name

    def conv_bn(self, x: str, conv: str, bn: str, stride: int, groups: int, relu6: bool) -> str:
        """Conv (no bias) followed by BatchNorm, folded; optional ReLU6."""
        w = self.take(f"{conv}.weight").astype(np.float64)
        gamma = self.take(f"{bn}.weight").astype(np.float64)
        beta = self.take(f"{bn}.bias").astype(np.float64)
        mean = self.take(f"{bn}.running_mean").astype(np.float64)
        var = self.take(f"{bn}.running_var").astype(np.float64)
        if f"{bn}.num_batches_tracked" in self.sd:
            self.take(f"{bn}.num_batches_tracked")
        if f"{conv}.bias" in self.sd:
            raise ValueError(f"{conv} unexpectedly has a bias")
        out_c, in_per_group, kh, kw = w.shape
        if gamma.shape != (out_c,) or kh != kw or kh not in (1, 3):
            raise ValueError(f"{conv}: unexpected shapes {w.shape} / {gamma.shape}")
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (beta - mean * scale).astype(np.float32)
        wn = self.conv_weight(f"{conv}.weight", wf)
        bnm = self.add_init(f"{conv}.bias", bf)
        pad = kh // 2
        y = self.fresh(conv)
        self.nodes.append(
            helper.make_node(
                "Conv", [x, wn, bnm], [y], name=conv,
                kernel_shape=[kh, kw], strides=[stride, stride], pads=[pad] * 4,
                dilations=[1, 1], group=groups,
            )
        )
        if relu6:
            z = self.fresh(f"{conv}.relu6")
            self.nodes.append(
                helper.make_node("Clip", [y, "clip_min", "clip_max"], [z], name=f"{conv}.relu6")
            )
            y = z
        return y

    def backbone(self, x: str) -> str:
        y = self.conv_bn(x, "features.0.0", "features.0.1", stride=2, groups=1, relu6=True)
        in_c = 32
        idx = 1
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                p = f"features.{idx}.conv"
                hidden = in_c * t
                h = y
                if t == 1:
                    h = self.conv_bn(h, f"{p}.0.0", f"{p}.0.1", stride, groups=hidden, relu6=True)
                    h = self.conv_bn(h, f"{p}.1", f"{p}.2", 1, groups=1, relu6=False)
                else:
                    h = self.conv_bn(h, f"{p}.0.0", f"{p}.0.1", 1, groups=1, relu6=True)
                    h = self.conv_bn(h, f"{p}.1.0", f"{p}.1.1", stride, groups=hidden, relu6=True)
                    h = self.conv_bn(h, f"{p}.2", f"{p}.3", 1, groups=1, relu6=False)
                if stride == 1 and in_c == c:
                    z = self.fresh(f"features.{idx}.add")
                    self.nodes.append(helper.make_node("Add", [y, h], [z], name=f"features.{idx}.add"))
                    h = z
                y = h
                in_c = c
                idx += 1
        assert idx == 18 and in_c == 320
        y = self.conv_bn(y, "features.18.0", "features.18.1", stride=1, groups=1, relu6=True)
        self.nodes.append(helper.make_node("GlobalAveragePool", [y], ["pooled"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1))
        return "features"

    def classifier(self, x: str) -> str:
        w = self.take("classifier.1.weight")
        b = self.take("classifier.1.bias")
        if w.shape != (NUM_CLASSES, FEATURE_DIM) or b.shape != (NUM_CLASSES,):
            raise ValueError(f"classifier shapes {w.shape} {b.shape}")
        self.add_init("classifier.1.weight", w.astype(np.float32))
        self.add_init("classifier.1.bias", b.astype(np.float32))
        self.nodes.append(
            helper.make_node("Gemm", [x, "classifier.1.weight", "classifier.1.bias"], ["logits"],
                             name="classifier.1", transB=1)
        )
        return "logits"


def _model(builder: GraphBuilder, out_name: str, out_dim: int, doc: str) -> onnx.ModelProto:
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_dim])
    graph = helper.make_graph(builder.nodes, "mobilenet_v2", [inp], [out], builder.inits)
    model = helper.make_model(
        graph, producer_name="wsa-models-convert", producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = 7  # the IR version that goes with opset 13; widest reader support
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    return model


def build_models(sd: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
    doc = ("torchvision MobileNetV2 IMAGENET1K_V1 (mobilenet_v2-b0353104.pth), BatchNorm folded, "
           "ReLU6 as Clip(0,6). Input: RGB in [0,1] normalised with mean (0.485,0.456,0.406), "
           "std (0.229,0.224,0.225), NCHW float32.")
    fb = GraphBuilder(sd)
    fb.backbone("input")
    features = _model(fb, "features", FEATURE_DIM, doc + " Output: 1280-d pooled features.")

    cb = GraphBuilder(sd)
    cb.classifier(cb.backbone("input"))
    classifier = _model(cb, "logits", NUM_CLASSES, doc + " Output: 1000 ImageNet logits.")

    qb = GraphBuilder(sd, int8_weights=True)
    qb.backbone("input")
    int8w = _model(qb, "features", FEATURE_DIM,
                   doc + " Conv weights int8, one scale per output channel. Output: 1280-d "
                   "pooled features.")

    unused = sorted(set(sd) - cb.used)
    if unused:
        raise ValueError(f"checkpoint entries not consumed: {unused}")
    return {"mobilenet_v2_features.onnx": features, "mobilenet_v2_classifier.onnx": classifier,
            "mobilenet_v2_features_int8w.onnx": int8w}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    ckpt, out_dir = Path(argv[1]), Path(argv[2])
    sd = load_legacy_state_dict(ckpt)
    n_params = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    print(f"convert: {len(sd)} state-dict entries, {n_params} values, from {ckpt}")
    models = build_models(sd)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        dest = out_dir / name
        tmp = dest.with_suffix(".onnx.tmp")
        tmp.write_bytes(model.SerializeToString(deterministic=True))
        tmp.replace(dest)
        print(f"convert: wrote {dest} ({dest.stat().st_size} bytes, "
              f"{len(model.graph.node)} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
