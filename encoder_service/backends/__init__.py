"""Encoder backends behind one seam (:class:`EncoderBackend`): ``torch`` runs the encoder in this
process, ``triton`` sends windows to an NVIDIA Triton Inference Server (see ``docs/encoders.md``).

Importing this package does not import ``tritonclient``; :mod:`.triton_backend` does."""

from encoder_service.backends.base import EncoderBackend, EncoderGeometry, Window
from encoder_service.backends.torch_backend import TorchBackend

BACKENDS = ("torch", "triton")

__all__ = ["BACKENDS", "EncoderBackend", "EncoderGeometry", "TorchBackend", "Window"]
