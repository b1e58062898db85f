"""A minimal MLServer custom runtime serving an ONNX model with ONNX Runtime: the /v2 peer of the bench.

MLServer has no ONNX runtime of its own, so this is the smallest ``MLModel`` that serves one: decode the
first input with MLServer's NumpyCodec, one ORT call (one intra-op thread, no spinning, as nnserve's
sessions), encode the output. Loaded by MLServer from the model folder that ``python -m
loadtest.baselines.mlserver`` writes; never imported by nnserve.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.settings.parameters.uri, options,
                                            providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        y = self.session.run([self.output], {self.session.get_inputs()[0].name: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self.output, y)])
