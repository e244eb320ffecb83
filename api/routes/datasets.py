"""`/v1/datasets`: `.npz` calibration / fine-tuning data (`inputs`, optional `labels`), streamed to disk."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.inspection import inspect_dataset_file
from api.routes.common import MULTIPART_BODY, CursorQ, LimitQ, check_cursor, in_thread, not_found, too_large_early
from api.schemas import DatasetOut, Page
from api.uploads import commit_upload_row, receive_upload
from db.ids import new_id
from db.models import DatasetRecord
from db.repositories import get_owned, page

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])



@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=MULTIPART_BODY,
             summary="Upload an .npz dataset with `inputs` and optional `labels`")
async def upload_dataset(request: Request, response: Response, session: SessionDep, tenant: TenantDep, store: StoreDep,
                         settings: SettingsDep) -> DatasetOut:
    await in_thread(session.close)  # auth is done: hold no DB connection while the body streams in
    too_large_early(request, settings.max_dataset_bytes)
    tmp = store.new_upload_path(".npz")
    up = await receive_upload(request.headers.get("content-type"), request.stream(), file_field="file",
                              dest=tmp, limit=settings.max_dataset_bytes)
    try:
        info = await inspect_dataset_file(str(tmp))  # DatasetRejected -> 422 via the HwpruneError handler
        row = DatasetRecord(
            id=new_id(), tenant_id=tenant.id, name=(up.fields.get("name") or up.filename or "dataset")[:256],
            samples=int(info["samples"]), has_labels=bool(info["has_labels"]),
            input_shape=list(info["input_shape"]), sha256=up.sha256, size_bytes=up.size,
        )
        row = await in_thread(commit_upload_row, request.app.state.session_factory, store, tmp,
                              store.dataset_path(row.tenant_id, row.id), row)
    finally:
        tmp.unlink(missing_ok=True)
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return DatasetOut.of(row)


@router.get("", response_model=Page[DatasetOut], summary="List your datasets, newest first")
def list_datasets(session: SessionDep, tenant: TenantDep, limit: LimitQ = 50,
                  cursor: CursorQ = None) -> Page[DatasetOut]:
    rows, nxt = page(session, DatasetRecord, tenant.id, limit, check_cursor(cursor))
    return Page[DatasetOut](items=[DatasetOut.of(r) for r in rows], next_cursor=nxt)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    row = get_owned(session, DatasetRecord, tenant.id, dataset_id)
    if row is None:
        raise not_found("dataset", dataset_id)
    return DatasetOut.of(row)
