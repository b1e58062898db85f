"""The Triton peer's model: a Triton Python-backend ``TritonPythonModel`` running the store entry's ONNX file
with ONNX Runtime. Copied as ``<repository>/<model>/1/model.py`` by ``triton_server.write_repository``
and run inside Triton's Python-backend stub process (one per instance); never imported by nnserve.

Why the Python backend: the ``nvidia-pytriton`` wheel ships Triton Inference Server itself (scheduler,
dynamic batcher, HTTP and gRPC front ends) but only the Python backend, not the native ONNX Runtime one.
This is the smallest model that backend documents for batching: ``execute`` receives every request the
dynamic batcher merged, concatenates their inputs into one ORT call, and answers each request its slice.

The session takes its settings from the model's ``parameters`` in config.pbtxt, named as Triton's ORT
backend names them (``intra_op_thread_count``, ``inter_op_thread_count``), and nnserve's session options
(no spinning: spinning threads steal the CPU the front end needs).
"""

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", "1"))
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(params["onnx_file"], options, providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        # Only the outputs some request asked for (an ORT run of a subset prunes the rest of the graph).
        asked = set().union(*(r.requested_output_names() for r in requests))
        names = [name for name in self.outputs if name in asked] or self.outputs
        x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        results = self.session.run(names, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        responses, start = [], 0
        for a in arrays:
            end = start + len(a)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(y[start:end]))
                                for name, y in zip(names, results, strict=True)]))
            start = end
        return responses
