"""Time ONNX Runtime on the graphs from build_onnx.py, as ember-inference-bench times burn.

Same inputs (golden windows: batch 1 = the first, batch 32 = all of them cycled), same
warmup + iterations + percentiles. Two thread settings: intra_op_num_threads=1 (the fair
comparison with single-threaded burn) and 0 (ORT's default: one thread per core). It also
times an Identity graph of the same input shape: the cost of the Python binding and session
call itself, which burn and tract (called from Rust) do not pay.

Usage: python3 bench_ort.py EXPORT_DIR ONNX_DIR ITERS WARMUP ROUND  -> JSON lines on stdout
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def timing(run, iters, warmup):
    for _ in range(warmup):
        run()
    samples = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter_ns()
        run()
        samples[i] = (time.perf_counter_ns() - t0) / 1e3
    samples.sort()
    pct = lambda p: float(samples[int(round((iters - 1) * p))])
    return {"p50_us": pct(0.5), "p99_us": pct(0.99), "min_us": float(samples[0]), "mean_us": float(samples.mean())}


def session(path_or_bytes, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def main():
    export_dir, onnx_dir = Path(sys.argv[1]), Path(sys.argv[2])
    iters, warmup, rnd = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    for path in sorted(export_dir.glob("*.json")):
        exported = json.loads(path.read_text())
        arch = exported["architecture"]
        c, w = arch["channels"], arch["window"]
        golden = [np.asarray(v["input"], dtype=np.float32).reshape(c, w) for v in exported["golden"]]
        for threads in (1, 0):
            sess = session(str(onnx_dir / (path.stem + ".onnx")), threads)
            for batch in (1, 32):
                x = np.stack([golden[i % len(golden)] for i in range(batch)])
                t = timing(lambda: sess.run(None, {"input": x}), iters, warmup)
                runtime = "ort-1thread" if threads == 1 else "ort-default"
                print(json.dumps({"round": rnd, "runtime": runtime, "model": path.stem, "batch": batch, **t}), flush=True)
    # The binding's own cost: an Identity graph on a batch-1 window.
    g = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 6, 100])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 100])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    sess = session(m.SerializeToString(), 1)
    x = np.zeros((1, 6, 100), dtype=np.float32)
    t = timing(lambda: sess.run(None, {"input": x}), iters, warmup)
    print(json.dumps({"round": rnd, "runtime": "ort-1thread", "model": "identity (binding overhead)", "batch": 1, **t}), flush=True)


if __name__ == "__main__":
    main()
