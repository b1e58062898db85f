"""A minimal MLServer custom runtime serving an ONNX model with ONNX Runtime: the /v2 peer of the bench.

MLServer has no ONNX runtime of its own, so this is the smallest ``MLModel`` that serves one: decode the
first input with MLServer's NumpyCodec, one ORT call (nnserve's session options: cores / workers intra-op
threads, ``BASELINE_ORT_THREADS`` from the launcher, no spinning), encode the output. With adaptive
batching on, MLServer hands ``predict`` the merged batch and splits the answer itself.
Loaded by MLServer from the model folder that ``python -m
loadtest.baselines.mlserver`` writes; never imported by nnserve.
"""

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("BASELINE_ORT_THREADS", "1"))
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.settings.parameters.uri, options,
                                            providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        y = self.session.run([self.output], {self.session.get_inputs()[0].name: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self.output, y)])
