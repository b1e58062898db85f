"""``sequence_lm``: a recurrent language model (embedding + LSTM/GRU + head, any sizes) sampled by ``/generate``.

The contract a user's module meets (or a few-line adapter module does, docs/your-model.md):

    forward(tokens, state) -> (scores, new_state)

- ``tokens`` int64 [B, T] (``lm.batch_first: false``: [T, B]);
- ``state`` is ``h`` for a GRU and ``(h, c)`` for an LSTM, each [layers, B, hidden] as PyTorch's own RNNs;
- ``scores`` [B, T, vocab] (or [T, B, vocab], or flattened [B*T, vocab] / [T*B, vocab]): logits or
  log-probabilities (sampling treats both alike).

The state's shape comes from the one ``nn.LSTM`` / ``nn.GRU`` inside the module. The exported graph has
explicit state: inputs ``tokens`` [B, T], ``h`` (, ``c``); outputs ``logits`` [B, T, V], ``h_out`` (, ``c_out``).
The rule for batch axes is written here once: the state is [layers, B, hidden], batched along axis 1;
tokens and scores along axis 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from models.kinds.base import FrontEnd, Kind, KindError, RequestError, errors, summarize
from models.vocab import Vocabulary, VocabularyError

STATE_BATCH_AXIS = 1  # [layers, B, hidden]
BATCH_SIZES = (1, 7, 64)
GREEDY_STEPS = 200
PROMPT_TOKENS = 64
PREFILL_WARMUP_LEN = 16  # one T > 1 shape at warm-up: prompts are prefilled in one call
# As models/train.py's evaluate_bpc cuts the held-out text (the state is carried across windows).
BPC_STREAMS, BPC_WINDOW = 16, 100
# Triton's (and OpenAI's) sampling parameter names -> GenerationRequest fields (service/generation.py).
SAMPLING_PARAMETERS = {"max_tokens": "max_new_chars", "temperature": "temperature", "top_k": "top_k",
                       "top_p": "top_p", "seed": "seed", "stop": "stop", "n": "n"}
# Parameters Triton clients send that change nothing here: the route decides streaming; Triton's own flags.
IGNORED_PARAMETERS = {"stream", "triton_enable_empty_final_response", "priority", "timeout"}


@dataclass
class TextSamples:
    valid: np.ndarray  # int64 token ids of held-out text (or random ids)
    source: str
    real: bool  # False: random token ids only


def vocabulary(card_or_metadata: dict) -> Vocabulary:
    lm = card_or_metadata.get("lm", {})
    return Vocabulary(card_or_metadata["vocab"], card_or_metadata.get("separator", lm.get("separator", "")))


class SequenceLM(Kind):
    name = "sequence_lm"
    endpoints = ("/generate",)
    generates = True

    # ---- serving --------------------------------------------------------------------------------------

    def state_names(self, metadata: dict) -> list[tuple[str, str]]:
        """(input, output) pairs of the recurrent state, in graph order."""
        return [tuple(pair) for pair in metadata["roles"]["state"]]

    def batch_axis(self, metadata: dict, tensor: str) -> int:
        return STATE_BATCH_AXIS if any(tensor in pair for pair in metadata["roles"]["state"]) else 0

    def example_feeds(self, metadata: dict, inputs: list, batch: int, seq_len: int = 1) -> dict[str, np.ndarray]:
        feeds = super().example_feeds(metadata, inputs, batch)
        tokens = metadata["roles"]["tokens"]
        feeds[tokens] = np.zeros((batch, seq_len), dtype=feeds[tokens].dtype)
        return feeds

    def warmup_feeds(self, metadata: dict, inputs: list, batch_sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
        return super().warmup_feeds(metadata, inputs, batch_sizes) + [
            self.example_feeds(metadata, inputs, 1, seq_len=PREFILL_WARMUP_LEN)]

    def describe(self, metadata: dict) -> dict:
        return {"vocab": vocabulary(metadata).describe(), "vocab_size": len(vocabulary(metadata)),
                "rnn": metadata.get("rnn")}

    def check_request_shapes(self, metadata: dict, shapes: dict[str, list[int]], limits) -> str | None:
        items, length = shapes[metadata["roles"]["tokens"]]
        if length > limits.max_sequence_length:
            return (f"input 'tokens' has sequence length {length}; the limit is {limits.max_sequence_length} tokens "
                    "per item (as a /generate prompt)")
        if items * length > limits.max_request_tokens:
            return (f"input 'tokens' has {items} x {length} = {items * length} tokens; the limit is "
                    f"{limits.max_request_tokens} per request (NNSERVE_MAX_REQUEST_TOKENS): split it into several "
                    "requests")
        return None

    def check_request_values(self, metadata: dict, arrays: dict[str, np.ndarray]) -> str | None:
        tokens, vocab_size = arrays[metadata["roles"]["tokens"]], len(vocabulary(metadata))
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            return f"token ids must be in [0, {vocab_size}), got values from {tokens.min()} to {tokens.max()}"
        return None

    # A prompt in, generated text out (text_output [n]: one element per sample), through the continuous
    # batcher; ModelStreamInfer streams a response per chunk (Triton's decoupled models).
    front_end: ClassVar[FrontEnd | None] = FrontEnd(
        suffix="text", role="prompt", input="text_input", input_shape=(1,), outputs=(("text_output", (-1,)),),
        decoupled=True, description="a prompt (UTF-8); sampling options as request parameters")

    def sampling_options(self, parameters: dict) -> tuple[dict, dict]:
        unknown = sorted(set(parameters) - set(SAMPLING_PARAMETERS) - IGNORED_PARAMETERS)
        if unknown:
            raise RequestError(f"unknown sampling parameter(s) {[str(u)[:50] for u in unknown[:5]]}; this model "
                               f"takes {sorted(SAMPLING_PARAMETERS)}")
        fields = {SAMPLING_PARAMETERS[k]: v for k, v in parameters.items() if k in SAMPLING_PARAMETERS}
        return fields, {field: name for name, field in SAMPLING_PARAMETERS.items()} | {"prompt": "text_input"}

    # ---- card and network -------------------------------------------------------------------------------

    def check_card(self, card: dict) -> None:
        try:
            vocabulary(card)
        except VocabularyError as e:
            raise KindError(f"card vocab: {e}") from e

    def rnn_of(self, model) -> dict:
        """cell, layers and state sizes from the one nn.LSTM / nn.GRU inside the module."""
        from torch import nn

        rnns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LSTM | nn.GRU)]
        if len(rnns) != 1:
            found = [n for n, _ in rnns] or "none"
            raise KindError(f"a sequence_lm needs exactly one nn.LSTM or nn.GRU (found {found}); wrap several "
                            "layers in one, or write an adapter module (docs/your-model.md)")
        name, rnn = rnns[0]
        if rnn.bidirectional:
            raise KindError(f"{name}: a bidirectional RNN cannot generate text left to right")
        cell = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
        proj = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        return {"cell": cell, "num_layers": rnn.num_layers, "hidden_size": rnn.hidden_size, "h_size": proj,
                "module": name}

    def export_wrapper(self, model, card: dict):
        """(tokens [B, T], h[, c]) -> (logits [B, T, V], h_out[, c_out]) around the user's module."""
        import torch
        from torch import nn

        rnn = self.rnn_of(model)
        lstm = rnn["cell"] == "lstm"
        batch_first = card.get("lm", {}).get("batch_first", True)
        vocab_size = len(vocabulary(card))

        class LMWrapper(nn.Module):
            input_names = ["tokens", "h", "c"] if lstm else ["tokens", "h"]
            output_names = ["logits", "h_out", "c_out"] if lstm else ["logits", "h_out"]

            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.model, self.rnn = inner, rnn

            def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None):
                batch, steps = tokens.shape
                scores, state = self.model(tokens if batch_first else tokens.transpose(0, 1), (h, c) if lstm else h)
                if scores.dim() == 2:  # flattened [B*T, V] or [T*B, V] (PyTorch's word_language_model)
                    scores = scores.reshape(batch, steps, -1) if batch_first else scores.reshape(steps, batch, -1)
                if not batch_first:
                    scores = scores.transpose(0, 1)
                return (scores, *state) if lstm else (scores, state)

        wrapper = LMWrapper(model).eval()
        wrapper.vocab_size = vocab_size  # type: ignore[assignment]  # a plain attribute, not a submodule
        return wrapper

    def example_inputs(self, wrapper, card: dict, batch: int = 2, seq_len: int = 5) -> tuple:
        import torch

        rnn = wrapper.rnn
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        h = torch.zeros(rnn["num_layers"], batch, rnn["h_size"])
        c = torch.zeros(rnn["num_layers"], batch, rnn["hidden_size"])
        return (tokens, h, c) if rnn["cell"] == "lstm" else (tokens, h)

    def dynamic_axes(self, wrapper) -> dict:
        axes = {name: {STATE_BATCH_AXIS: "batch"} for name in wrapper.input_names[1:] + wrapper.output_names[1:]}
        return {"tokens": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}, **axes}

    def probe(self, wrapper, card: dict) -> dict:
        """One eager call: the scores' width must be the vocabulary's, the state must come back as it went in."""
        import torch

        vocab_size = wrapper.vocab_size
        embeddings = [m for m in wrapper.modules() if isinstance(m, torch.nn.Embedding)]
        if len(embeddings) == 1 and embeddings[0].num_embeddings != vocab_size:
            raise KindError(f"the card's vocab has {vocab_size} tokens but the network's embedding has "
                            f"{embeddings[0].num_embeddings} rows: the vocab must list one token per embedding row")
        inputs = self.example_inputs(wrapper, card)
        layout = card.get("lm", {}).get("batch_first", True)
        swap = (f"if the module reads tokens as {'[T, B]' if layout else '[B, T]'}, set lm.batch_first to "
                f"{str(not layout).lower()} in the card")
        try:
            with torch.no_grad():
                outs = wrapper(*inputs)
        except Exception as e:
            raise KindError(f"the network does not follow the sequence_lm contract forward(tokens, state) -> "
                            f"(scores, state) (docs/your-model.md): {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}; {swap}") from e
        if tuple(outs[0].shape) != (2, 5, vocab_size):
            raise KindError(f"scores for tokens [2, 5] have shape {list(outs[0].shape)}; expected [2, 5, "
                            f"{vocab_size}] (batch, steps, vocab size from the card's vocab)")
        for name, given, got in zip(wrapper.output_names[1:], inputs[1:], outs[1:], strict=True):
            if tuple(got.shape) != tuple(given.shape):
                raise KindError(f"state output {name} has shape {list(got.shape)}, expected {list(given.shape)}")
        # Rows of a batch must not see each other: with the time and batch axes swapped they do.
        tokens = torch.randint(0, vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            together = wrapper(tokens, *inputs[1:])[0][:1]
            alone = wrapper(tokens[:1], *(s[:, :1] for s in inputs[1:]))[0]
        if not torch.allclose(together, alone, atol=1e-4, rtol=1e-4):
            raise KindError(f"the scores of one sequence change with the other sequences of its batch: {swap}")
        return {"logits": vocab_size}

    # ---- store metadata -------------------------------------------------------------------------------

    def roles_for(self, output_names: list[str], input_names: list[str], card: dict) -> dict:
        return {"tokens": input_names[0], "scores": output_names[0],
                "state": [[i, o] for i, o in zip(input_names[1:], output_names[1:], strict=True)]}

    def store_metadata(self, card: dict, roles: dict, outputs: list[dict] | None = None, model=None) -> dict:
        meta = {"roles": roles, "vocab": card["vocab"], "scores": card.get("scores", "logits")}
        if card.get("lm", {}).get("separator"):
            meta["separator"] = card["lm"]["separator"]
        if model is not None:
            meta["rnn"] = {k: v for k, v in self.rnn_of(model).items() if k != "module"}
        return meta

    # ---- samples, parity and INT8 ------------------------------------------------------------------------

    def load_samples(self, card: dict, artifact_dir: Path, eval_data: Path | None) -> TextSamples:
        """Held-out text: the user's (--eval-data, a UTF-8 file), else our training text's held-out split when
        the card names it, else random token ids (said so in the certificate)."""
        from models import data, shakespeare

        vocab = vocabulary(card)
        if eval_data is not None:
            text = eval_data.read_text(encoding="utf-8")
            source = f"evaluation text {eval_data}"
        elif card.get("dataset", {}).get("source") == shakespeare.SOURCE:
            # The validation plays the card names (the test plays stay for the final number only).
            plays = tuple(card["dataset"]["split"]["valid_plays"])
            text = shakespeare.load_split(valid_plays=plays, test_plays=()).valid
            source = f"held-out plays {', '.join(plays)} ({shakespeare.SOURCE})"
        elif card.get("dataset", {}).get("source") == data.TEXT_SOURCE:
            training = card.get("training", {})
            text, _ = data.load_text(training.get("text"))
            if training.get("text_limit"):
                text = text[:training["text_limit"]]
            text = data.split_text(text)[1]
            source = f"held-out split of {data.TEXT_SOURCE}"
        else:
            ids = np.random.default_rng(0).integers(0, len(vocab), 4 * PROMPT_TOKENS)
            return TextSamples(ids, "random token ids only (no evaluation text given: --eval-data)", False)
        try:
            ids = np.array(vocab.encode(text), dtype=np.int64)
        except VocabularyError as e:
            raise KindError(f"{source}: {e}") from e
        if len(ids) < 2 * BPC_STREAMS:
            raise KindError(f"{source} has {len(ids)} tokens; parity and the INT8 gate need at least {2 * BPC_STREAMS}")
        return TextSamples(ids, source, True)

    def certify(self, wrapper, session, samples: TextSamples, max_abs_error: float) -> dict:
        """Random tokens and state at batch 1, 7, 64; then a prompt prefilled in one call and 200 greedy decode
        steps, each side feeding its own state back."""
        from models.kinds.torch_utils import run_torch

        names, rng = wrapper.output_names, np.random.default_rng(0)
        inputs = [i.name for i in session.get_inputs()]
        checks = []
        for batch in BATCH_SIZES:
            example = self.example_inputs(wrapper, {}, batch, 16)
            arrays = [rng.integers(0, wrapper.vocab_size, (batch, 16))] + [
                (0.5 * rng.standard_normal(tuple(s.shape))).astype(np.float32) for s in example[1:]]
            checks.append({"batch": batch, "inputs": "random", "seq_len": 16, "errors": errors(
                run_torch(wrapper, arrays), session.run(None, dict(zip(inputs, arrays, strict=True))), names)})
        prompt = samples.valid[:PROMPT_TOKENS][None]
        state = [s.numpy() for s in self.example_inputs(wrapper, {}, 1)[1:]]
        torch_in, onnx_in = [prompt, *state], [prompt, *state]
        torch_ids, onnx_ids = [], []
        for step in range(GREEDY_STEPS + 1):
            ref, got = run_torch(wrapper, torch_in), session.run(None, dict(zip(inputs, onnx_in, strict=True)))
            checks.append({"batch": 1, "inputs": "prompt_then_greedy", "step": step, "errors": errors(ref, got, names)})
            torch_next, onnx_next = int(ref[0][0, -1].argmax()), int(got[0][0, -1].argmax())
            torch_ids.append(torch_next)
            onnx_ids.append(onnx_next)
            # Each side continues from its own outputs: the state really round-trips through ONNX.
            torch_in, onnx_in = [np.array([[torch_next]]), *ref[1:]], [np.array([[onnx_next]]), *got[1:]]
        summary = summarize(checks, names, max_abs_error)
        identical = torch_ids == onnx_ids
        greedy = [c for c in checks if c["inputs"] == "prompt_then_greedy"]
        checks = [c for c in checks if c["inputs"] != "prompt_then_greedy"] + [
            {"batch": 1, "inputs": "prompt_then_greedy", "steps": GREEDY_STEPS,
             "errors": summarize(greedy, names, max_abs_error)["worst"]}]
        return {"tolerance_max_abs": max_abs_error, "tolerance_rule": "max_abs_error x max(1, max |output|)",
                "max_abs": summary["max_abs"], "max_rel": summary["max_rel"], "worst": summary["worst"],
                "samples": samples.source, "prompt_tokens": int(prompt.shape[1]), "greedy_steps": GREEDY_STEPS,
                "greedy_identical": identical, "torch_continuation": torch_ids[:GREEDY_STEPS],
                "onnx_continuation": onnx_ids[:GREEDY_STEPS], "checks": checks,
                "passed": summary["within_tolerance"] and identical}

    def summary_line(self, cert: dict) -> str:
        return f"greedy {cert['greedy_steps']}-token continuation identical: {cert['greedy_identical']}"

    def int8_recipe(self, metadata: dict) -> dict:
        # ORT has an INT8 LSTM kernel (DynamicQuantizeLSTM) but none for GRU: there only the MatMuls.
        lstm = metadata["rnn"]["cell"] == "lstm"
        return {"mode": "dynamic", "op_types": ["MatMul", "LSTM"] if lstm else ["MatMul"],
                "not_quantized": [] if lstm else ["GRU (no INT8 kernel in ONNX Runtime)"]}

    def int8_quality(self, fp32_path: Path, int8_path: Path, metadata: dict, samples: TextSamples, opts) -> dict:
        if not samples.real:
            raise KindError("INT8 needs held-out text to measure bits per token: pass --eval-data")
        fp32_bpt, int8_bpt = bits_per_token(fp32_path, metadata, samples), bits_per_token(int8_path, metadata, samples)
        delta = int8_bpt - fp32_bpt
        passed = delta <= opts.int8_max_bpc_increase
        return {"passed": passed,
                "verdict": f"held-out bits/token {fp32_bpt:.4f} -> {int8_bpt:.4f} ({delta:+.4f}, allowed "
                           f"+{opts.int8_max_bpc_increase:g})",
                "metrics": {"int8_valid_bpc": int8_bpt, "fp32_onnx_valid_bpc": fp32_bpt},
                "parity": {"reference": "fp32 ONNX graph", "fp32_bpc": fp32_bpt, "int8_bpc": int8_bpt,
                           "bpc_delta": delta, "passed": passed}}


def bits_per_token(path: Path, metadata: dict, samples: TextSamples) -> float:
    """Held-out bits per token through ONNX Runtime: 16 contiguous streams, state carried across windows."""
    import math

    from models.kinds.base import cpu_session

    length = len(samples.valid) // BPC_STREAMS
    streams = samples.valid[:length * BPC_STREAMS].reshape(BPC_STREAMS, length)  # models.train.batchify
    x, y = streams[:, :-1], streams[:, 1:]
    session = cpu_session(path)
    roles = metadata["roles"]
    state = {i: np.zeros([d if d >= 0 else BPC_STREAMS for d in spec["shape"]], np.float32)
             for i, _ in roles["state"] for spec in metadata["inputs"] if spec["name"] == i}
    nats, count = 0.0, 0
    for i in range(0, x.shape[1], BPC_WINDOW):
        outs = dict(zip([o["name"] for o in metadata["outputs"]],
                        session.run(None, {roles["tokens"]: x[:, i:i + BPC_WINDOW], **state}), strict=True))
        logits, target = outs[roles["scores"]].astype(np.float64), y[:, i:i + BPC_WINDOW]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= np.take_along_axis(log_probs, target[..., None], -1).sum()
        count += target.size
        state = {i: outs[o] for i, o in roles["state"]}
    return float(nats / count / math.log(2))
