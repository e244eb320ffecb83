"""Artifact store: a local folder (a shared volume under compose). Paths are built from row ids only.

Layout: `<root>/tenants/<tenant>/models/<id>/model.<ext>`, `.../datasets/<id>/data.npz`,
`.../jobs/<id>/` (the pipeline's work dir: dense.onnx, model.onnx, partial_report.json, report.json),
`<root>/tmp/` for uploads in flight (same filesystem, so finishing an upload is an atomic rename).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from db.ids import check_id

MODEL_FILENAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
# Job artifacts a client may download, by the name in the URL.
JOB_ARTIFACTS = {"model.onnx": "model.onnx", "report.json": "report.json"}


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _tenant(self, tenant_id: str) -> Path:
        return self.root / "tenants" / check_id(tenant_id)

    def model_dir(self, tenant_id: str, model_id: str) -> Path:
        return self._tenant(tenant_id) / "models" / check_id(model_id)

    def model_path(self, tenant_id: str, model_id: str, fmt: str) -> Path:
        assert fmt in MODEL_FILENAMES, f"unknown model format {fmt!r}"
        return self.model_dir(tenant_id, model_id) / MODEL_FILENAMES[fmt]

    def dataset_path(self, tenant_id: str, dataset_id: str) -> Path:
        return self._tenant(tenant_id) / "datasets" / check_id(dataset_id) / "data.npz"

    def job_dir(self, tenant_id: str, job_id: str) -> Path:
        return self._tenant(tenant_id) / "jobs" / check_id(job_id)

    def job_artifact(self, tenant_id: str, job_id: str, name: str) -> Path:
        assert name in JOB_ARTIFACTS, f"not a job artifact: {name!r}"
        return self.job_dir(tenant_id, job_id) / JOB_ARTIFACTS[name]

    def new_upload_path(self, suffix: str = "") -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        assert suffix in ("", ".onnx", ".pt", ".npz"), f"unexpected suffix {suffix!r}"
        return tmp / f"upload-{secrets.token_hex(12)}{suffix}"

    def commit_upload(self, tmp_path: Path, final: Path) -> None:
        """Move a finished upload into place (rename on the same filesystem: readers never see half a file)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.replace(final)
