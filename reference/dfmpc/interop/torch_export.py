"""PyTorch helpers (torch is imported lazily; it is an optional dependency).

:func:`export_onnx` is *the* way this project exports a PyTorch model: the
TorchScript exporter (``dynamo=False``, works offline, no onnxscript) with
``training=TrainingMode.PRESERVE`` on an eval-mode model.  In plain eval
mode that exporter folds every BatchNorm into the preceding conv, which
would hide exactly the statistics DF-MPC edits; PRESERVE on an eval-mode
model keeps each BatchNorm as a ``BatchNormalization`` node carrying the
running statistics, and ``do_constant_folding=False`` keeps the exporter from
merging anything else.  (The exporter links parameters that happen to be
equal with ``Identity`` nodes; the importer folds those back.)
"""

from __future__ import annotations

import io
import os

from ..engine.graph import Graph
from ._atomic import write_atomically


def export_onnx(model, path: str | os.PathLike, input_shape, opset: int = 13,
                overwrite: bool = False) -> None:
    """Export a PyTorch model to ONNX with BatchNorm kept as BatchNormalization nodes.

    Parameters
    ----------
    model : torch.nn.Module
        Put in eval mode (``model.eval()``) by this function.
    path : str or PathLike
        Destination ``.onnx`` file, written atomically.
    input_shape : tuple of int
        ``(C, H, W)`` of one image; the batch axis is exported as dynamic (``"N"``).
    opset : int
        ONNX opset for the exporter.
    overwrite : bool
        Replace an existing file (default: FileExistsError).

    Raises
    ------
    RuntimeError
        The exported graph has fewer BatchNormalization nodes than the model
        has BatchNorm layers (nothing is written).

    Example
    -------
    >>> export_onnx(net, "net.onnx", (1, 28, 28))      # doctest: +SKIP
    >>> g = dfmpc.load_model("net.onnx")               # doctest: +SKIP
    """
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros((1,) + tuple(input_shape))
    buf = io.BytesIO()
    torch.onnx.export(model, (dummy,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=opset)
    data = buf.getvalue()
    proto = onnx.load_from_string(data)
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    n_bn_torch = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n_bn < n_bn_torch:
        raise RuntimeError(f"the export folded BatchNorm: {n_bn} BatchNormalization nodes "
                           f"for {n_bn_torch} BatchNorm layers")
    write_atomically(path, lambda f: f.write(data), overwrite)


def graph_from_torch(model, input_shape, opset: int = 13) -> Graph:
    """Export ``model`` with :func:`export_onnx` (in memory) and import it as a :class:`Graph`.

    Parameters
    ----------
    model : torch.nn.Module
    input_shape : tuple of int
        ``(C, H, W)`` of one image.
    opset : int

    Returns
    -------
    Graph
    """
    import tempfile

    from .onnx_import import load_onnx

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "model.onnx")
        export_onnx(model, p, input_shape, opset)
        return load_onnx(p)
