"""Deployment stage: Triton Inference Server model repositories and the bundled server.

``deploy(model, repo, ...)`` writes a repository (python / onnxruntime / tensorrt backends);
``serve(repo, ...)`` starts the ``tritonserver`` of the ``nvidia-pytriton`` wheel on it and returns
a :class:`TritonServer` (a context manager; ``.stop()``) once it is ready.
"""

from fp_export.deploy.repository import BACKENDS, DeployError, deploy
from fp_export.deploy.server import ServerUnavailable, TritonServer, serve

__all__ = ["BACKENDS", "DeployError", "ServerUnavailable", "TritonServer", "deploy", "serve"]
