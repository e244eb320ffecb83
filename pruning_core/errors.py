"""User-facing errors: every failure a user can act on is one of these, with a message that says what to fix.

Callers (CLI, API, worker) show `str(error)` to the user; anything that is not a `HwpruneError` is a bug.
"""


class HwpruneError(Exception):
    """Base class: a problem with the user's input or request, not a crash."""


class InvalidRequest(HwpruneError):
    """The job parameters are impossible or inconsistent (sparsity 1.0, N > M, unknown profile...)."""


class ModelRejected(HwpruneError):
    """The uploaded model cannot be used (not ONNX/TorchScript, unsupported op, conversion disagrees)."""


class UnsupportedOp(ModelRejected):
    """An ONNX op (with its opset) that the converter cannot turn into torch."""

    def __init__(self, op_type: str, opset: int, domain: str = "", detail: str = "") -> None:
        self.op_type, self.opset, self.domain, self.detail = op_type, opset, domain, detail
        where = f"{domain or 'ai.onnx'}::{op_type} (opset {opset})"
        super().__init__(f"unsupported ONNX op {where}" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[type, tuple[str, int, str, str]]:
        """Crosses process boundaries intact (the API inspects uploads in a spawned process)."""
        return (UnsupportedOp, (self.op_type, self.opset, self.domain, self.detail))


class DatasetRejected(HwpruneError):
    """The calibration / fine-tuning data cannot be used with this model."""


class Cancelled(HwpruneError):
    """The job was cancelled by its owner while it ran."""
