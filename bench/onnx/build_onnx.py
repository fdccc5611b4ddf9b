"""Build an ONNX graph from `ember-inference-bench export` JSON and check it against burn.

The graph is the burn model operator for operator (models/src/activity.rs, anomaly.rs):
it takes *raw* windows [batch, channels, window] and starts with the manifest's per-channel
normalization, exactly like `LoadedModel::infer`, so every runtime gets the same input.

int8 bundles: burn dequantizes the weights once at load; the export holds those dequantized
values (exactly q * scale, symmetric, one scale per tensor) and the graph uses them as f32,
which is what burn computes with. EMBER_ONNX_INT8_DQ=1 stores q as int8 with a
DequantizeLinear per tensor instead (smaller file; ORT then deviates by ~1.3e-4).

Usage: python3 build_onnx.py EXPORT_DIR OUT_DIR   (exits non-zero if ORT disagrees with burn)
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
TOLERANCE = 1e-4


class Graph:
    def __init__(self, exported):
        self.nodes = []
        self.inits = []
        self.tensors = {t["name"]: t for t in exported["tensors"]}
        # int8 as int8 + DequantizeLinear made ORT deviate by 1.3e-4 on activity-int8 (it
        # rewrites DQ -> Conv into its own quantized path); burn runs int8 bundles on their
        # dequantized f32 values, so the comparison uses exactly those values. Set
        # EMBER_ONNX_INT8_DQ=1 to get the DequantizeLinear form anyway.
        self.int8 = exported["precision"] == "int8" and os.environ.get("EMBER_ONNX_INT8_DQ") == "1"
        self.n = 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def param(self, key):
        t = self.tensors[key]
        w = np.asarray(t["values"], dtype=np.float32).reshape(t["shape"])
        if not self.int8:
            return self.const(key, w)
        top = float(np.abs(w).max())
        for levels in (127.0, 128.0, 127.5):
            scale = np.float32(top / levels) if top > 0 else np.float32(1.0)
            q = np.round(w / scale)
            # The exact f32 scale burn used: w = q * scale elementwise, so take it from w / q.
            nz = q != 0
            if nz.any():
                scale = np.float32(np.median(w[nz].astype(np.float64) / q[nz]))
            if q.min() >= -128 and q.max() <= 127 and np.abs(q.astype(np.float32) * scale - w).max() <= 1e-6 * max(1.0, top):
                break
        else:
            raise SystemExit(f"{key}: weights are not q * scale with a symmetric per-tensor int8 scale")
        self.const(key + ".q", q.astype(np.int8))
        self.const(key + ".scale", scale)
        self.const(key + ".zero", np.int8(0))
        out = key
        self.nodes.append(helper.make_node("DequantizeLinear", [key + ".q", key + ".scale", key + ".zero"], [out]))
        return out

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x, layer, stride, pad):
        w = self.param(f"{layer}.weight")
        b = self.param(f"{layer}.bias")
        k = self.tensors[f"{layer}.weight"]["shape"][2]
        return self.op("Conv", [x, w, b], kernel_shape=[k], strides=[stride], pads=[pad[0], pad[1]])

    def deconv(self, x, layer, stride, pad):
        w = self.param(f"{layer}.weight")
        b = self.param(f"{layer}.bias")
        k = self.tensors[f"{layer}.weight"]["shape"][2]
        return self.op("ConvTranspose", [x, w, b], kernel_shape=[k], strides=[stride], pads=[pad, pad])


def same_pad(k):
    # burn's PaddingConfig1d::Same at stride 1: total k - 1, the extra one (if any) at the end.
    return ((k - 1) // 2, (k - 1) - (k - 1) // 2)


def build(exported):
    arch = exported["architecture"]
    c, w = arch["channels"], arch["window"]
    g = Graph(exported)
    norm = exported["normalization"]
    mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, c, 1)
    std = np.asarray(norm["std"], dtype=np.float32).reshape(1, c, 1)
    x = g.op("Sub", ["input", g.const("norm.mean", mean)])
    x = g.op("Div", [x, g.const("norm.std", std)])
    if arch["kind"] == "activity":
        k = arch["kernel_size"]
        h = g.op("Relu", [g.conv(x, "conv1", 1, same_pad(k))])
        h = g.op("MaxPool", [h], kernel_shape=[2], strides=[2])
        h = g.op("Relu", [g.conv(h, "conv2", 1, same_pad(k))])
        h = g.op("MaxPool", [h], kernel_shape=[2], strides=[2])
        h = g.op("Relu", [g.conv(h, "conv3", 1, same_pad(k))])
        h = g.op("ReduceMean", [h], axes=[2], keepdims=0)  # AdaptiveAvgPool1d(1) + flatten
        logits = g.op("Gemm", [h, g.param("head.weight"), g.param("head.bias")])  # weight [in, out]
        out = g.op("Softmax", [logits], axis=1)
        outputs = arch["num_classes"]
    else:
        h = g.op("Relu", [g.conv(x, "enc1", 2, (2, 2))])
        h = g.op("Relu", [g.conv(h, "enc2", 2, (2, 2))])
        z = g.conv(h, "bottleneck", 1, same_pad(3))
        h = g.op("Relu", [g.conv(z, "expand", 1, same_pad(3))])
        h = g.op("Relu", [g.deconv(h, "dec1", 2, 1)])
        recon = g.deconv(h, "dec2", 2, 1)
        err = g.op("Sub", [recon, x])
        err = g.op("Mul", [err, err])
        err = g.op("Flatten", [err], axis=1)
        out = g.op("ReduceMean", [err], axes=[1], keepdims=1)  # [batch, 1], like Net::outputs
        outputs = 1
    g.nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        g.nodes,
        f"ember-{arch['kind']}-{exported['precision']}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ember bench/onnx")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def check(model_path, exported):
    """Max |ORT - burn| over the golden vectors, one window at a time and all at once."""
    arch = exported["architecture"]
    c, w = arch["channels"], arch["window"]
    golden = exported["golden"]
    worst = 0.0
    for threads in (1, 0):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        for v in golden:
            x = np.asarray(v["input"], dtype=np.float32).reshape(1, c, w)
            got = sess.run(None, {"input": x})[0].reshape(-1)
            worst = max(worst, float(np.abs(got - np.asarray(v["output"], dtype=np.float32)).max()))
        xb = np.stack([np.asarray(v["input"], dtype=np.float32).reshape(c, w) for v in golden])
        want = np.stack([np.asarray(v["output"], dtype=np.float32) for v in golden])
        got = sess.run(None, {"input": xb})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    failed = False
    for path in sorted(src.glob("*.json")):
        exported = json.loads(path.read_text())
        model = build(exported)
        out = dst / (path.stem + ".onnx")
        onnx.save(model, out)
        worst = check(out, exported)
        ok = worst <= TOLERANCE
        failed |= not ok
        print(json.dumps({"model": path.stem, "onnx": str(out), "onnx_bytes": out.stat().st_size,
                          "golden_vectors": len(exported["golden"]),
                          "max_abs_diff_ort_vs_burn_golden": worst, "ok": ok}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
