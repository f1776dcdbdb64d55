"""Triton python-backend model for an fp-export checkpoint; copied into a repository as ``model.py``.

Runs inside the python backend stub, in the environment named by the model's ``EXECUTION_ENV_PATH``
(it must import ``fp_export`` and torch). Parameters from ``config.pbtxt``:

- ``MODE``: ``generate`` or ``logits``.
- ``CHECKPOINT``: the checkpoint directory, relative to this model's directory in the repository.
- ``DEVICE`` (generate): ``""`` = ``fp_export.generate``'s default (the GPU runtime on CUDA when
  available, else the CPU reference), or ``cpu`` / ``cuda``.

``generate`` (decoupled, dynamic batching): per request ``input_ids`` INT64 [1, seq] (one prompt;
the leading 1 is the batch dimension), ``max_tokens`` INT32 [1, 1]; optional ``temperature`` FP32,
``top_k`` INT32, ``top_p`` FP32, ``seed`` INT64, ``stream`` BOOL, each [1, 1]. Output
``output_ids`` INT64 [1, n]: with ``stream`` one response per token ([1, 1], in order) and then an
empty response flagged final; without, one response with every token, flagged final. Generation
stops after ``max_tokens`` tokens or after the tokenizer's end-of-sequence token (included).
Greedy requests (temperature 0) of equal prompt length that arrive together run as one batch;
sampled requests run one at a time (each with its own seed).

``logits`` (not decoupled): ``input_ids`` INT64 [batch, seq] -> ``logits`` FP32 [batch, seq, vocab],
the checkpoint's PyTorch model on CPU (the validation reference).

Tensors cross the stub by DLPack (torch), never as numpy arrays: the stub of the bundled Triton
2.51 returns empty outputs for ``pb_utils.Tensor(name, ndarray)`` when numpy 2.x is installed,
while ``Tensor.from_dlpack`` / ``to_dlpack`` work with numpy 1.x and 2.x alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

import fp_export as fx

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class RequestError(ValueError):
    """A request the model refuses; the message names the input and the problem."""


def _tensor(request, name: str) -> torch.Tensor | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else from_dlpack(t.to_dlpack()).clone()


def _scalar(request, name: str, default):
    t = _tensor(request, name)
    if t is None:
        return default
    if t.numel() != 1:
        raise RequestError(f"{name}: expected one value (shape [1, 1]), got shape {list(t.shape)}")
    return t.reshape(()).item()


def _output(name: str, t: torch.Tensor):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(t.contiguous()))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.mode = params["MODE"]
        self.device = params.get("DEVICE") or None
        checkpoint = (Path(args["model_repository"]) / params["CHECKPOINT"]).resolve()
        self.qm = fx.load(checkpoint)
        cfg = self.qm.model.config
        self.vocab = self.qm.model.get_input_embeddings().num_embeddings
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0))
        self.eos = self.qm.tokenizer.eos_token_id

    def _check_ids(self, ids: torch.Tensor, extra: int = 0) -> None:
        if ids.dim() != 2:
            raise RequestError(f"input_ids: expected rank 2 [batch, seq], got shape {list(ids.shape)}")
        if ids.numel() == 0:
            raise RequestError(f"input_ids is empty (shape {list(ids.shape)}): send at least one token")
        bad = (ids < 0) | (ids >= self.vocab)
        if bad.any():
            pos = [int(i) for i in bad.nonzero()[0]]
            raise RequestError(f"input_ids: token id {int(ids[tuple(pos)])} at {pos} is outside the vocabulary "
                               f"[0, {self.vocab})")
        if self.context and ids.shape[1] + extra > self.context:
            what = f"{ids.shape[1]} prompt tokens + max_tokens {extra}" if extra else f"{ids.shape[1]} tokens"
            raise RequestError(f"{what} exceed the model's context of {self.context} tokens")

    def execute(self, requests):
        if self.mode == "logits":
            return [self._logits(r) for r in requests]
        self._generate(requests)
        return None

    def _logits(self, request):
        try:
            ids = _tensor(request, "input_ids")
            self._check_ids(ids)
            with torch.inference_mode():
                logits = self.qm.model(input_ids=ids).logits.float()
            return pb_utils.InferenceResponse(output_tensors=[_output("logits", logits)])
        except RequestError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))

    def _parse(self, request) -> dict:
        ids = _tensor(request, "input_ids")
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise RequestError(f"input_ids: one prompt per request (shape [1, seq]), got shape {list(ids.shape)}")
        n = int(_scalar(request, "max_tokens", 0))
        if n < 1:
            raise RequestError(f"max_tokens must be >= 1, got {n}")
        self._check_ids(ids, n)
        p = {"temperature": float(_scalar(request, "temperature", 0.0)), "top_k": int(_scalar(request, "top_k", 0)),
             "top_p": float(_scalar(request, "top_p", 1.0)), "seed": _scalar(request, "seed", None)}
        if not p["temperature"] >= 0.0:
            raise RequestError(f"temperature must be >= 0, got {p['temperature']}")
        if p["top_k"] < 0:
            raise RequestError(f"top_k must be >= 0 (0 = no limit), got {p['top_k']}")
        if not 0.0 < p["top_p"] <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {p['top_p']}")
        return {"ids": ids, "max_tokens": n, "stream": bool(_scalar(request, "stream", False)), "params": p}

    def _generate(self, requests) -> None:
        groups: dict[tuple, list] = {}
        for r in requests:
            sender = r.get_response_sender()
            try:
                job = self._parse(r)
            except RequestError as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
                continue
            job["sender"] = sender
            greedy = job["params"]["temperature"] == 0.0
            key = ("greedy", job["ids"].shape[1]) if greedy else ("sampled", len(groups))
            groups.setdefault(key, []).append(job)
        for jobs in groups.values():
            try:
                self._run(jobs)
            except Exception as e:  # a failure inside generation answers every request of the batch
                for job in jobs:
                    if not job.get("done"):
                        job["sender"].send(pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(f"generation failed: {type(e).__name__}: {e}")), flags=FINAL)

    def _run(self, jobs: list[dict]) -> None:
        ids = torch.cat([j["ids"] for j in jobs])
        n = max(j["max_tokens"] for j in jobs)
        for j in jobs:
            j["tokens"] = []

        def on_token(step: int, tokens: torch.Tensor) -> None:
            for j, t in zip(jobs, tokens.tolist()):
                if j.get("done"):
                    continue
                j["tokens"].append(t)
                if j["stream"]:
                    j["sender"].send(pb_utils.InferenceResponse([_output("output_ids", torch.tensor([[t]]))]))
                if len(j["tokens"]) == j["max_tokens"] or t == self.eos:
                    self._finish(j)

        p = jobs[0]["params"]
        fx.generate(self.qm, ids, n, temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                    seed=p["seed"], eos_token_id=self.eos, on_token=on_token, device=self.device)
        for j in jobs:
            if not j.get("done"):
                self._finish(j)

    @staticmethod
    def _finish(job: dict) -> None:
        job["done"] = True
        if job["stream"]:
            job["sender"].send(flags=FINAL)
        else:
            out = torch.tensor([job["tokens"]], dtype=torch.int64)
            job["sender"].send(pb_utils.InferenceResponse([_output("output_ids", out)]), flags=FINAL)
