"""`/v1/models`: upload (streamed, size-limited, hashed, cheaply inspected) and read back ONNX/TorchScript."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.inspection import inspect_model_file
from api.problems import Problem
from api.routes.common import MULTIPART_BODY, CursorQ, LimitQ, check_cursor, in_thread, not_found, too_large_early
from api.schemas import ModelOut, Page
from api.uploads import commit_upload_row, receive_upload
from db.ids import new_id
from db.models import ModelRecord
from db.repositories import get_owned, page
from pruning_core.spec import parse_input_shape

router = APIRouter(prefix="/v1/models", tags=["models"])
log = logging.getLogger("hwprune.api")



@router.post("", status_code=201, response_model=ModelOut, openapi_extra=MULTIPART_BODY,
             summary="Upload an ONNX or TorchScript model")
async def upload_model(request: Request, response: Response, session: SessionDep, tenant: TenantDep, store: StoreDep,
                       settings: SettingsDep) -> ModelOut:
    await in_thread(session.close)  # auth is done: hold no DB connection while the body streams in
    too_large_early(request, settings.max_upload_bytes)
    tmp = store.new_upload_path()
    up = await receive_upload(request.headers.get("content-type"), request.stream(), file_field="file",
                              dest=tmp, limit=settings.max_upload_bytes)
    try:
        shape_text = up.fields.get("input_shape", "").strip()
        input_shape = parse_input_shape(shape_text) if shape_text else None
        info = await inspect_model_file(str(tmp), input_shape)  # ModelRejected -> 422
        if info["format"] == "torchscript" and input_shape is None:
            raise Problem(422, "TorchScript models need input_shape, e.g. input_shape=1,3,224,224")
        name = (up.fields.get("name") or up.filename or "model")[:256]
        row = ModelRecord(
            id=new_id(), tenant_id=tenant.id, name=name, format=info["format"], opset=info.get("opset"),
            inputs=info.get("inputs", []), outputs=info.get("outputs", []), params=int(info.get("params", 0)),
            macs=int(info.get("macs", 0)), input_shape=input_shape, sha256=up.sha256, size_bytes=up.size,
        )
        row = await in_thread(commit_upload_row, request.app.state.session_factory, store, tmp,
                              store.model_path(row.tenant_id, row.id, row.format), row)
    finally:
        tmp.unlink(missing_ok=True)
    response.headers["Location"] = f"/v1/models/{row.id}"
    return ModelOut.of(row)


@router.get("", response_model=Page[ModelOut], summary="List your models, newest first")
def list_models(session: SessionDep, tenant: TenantDep, limit: LimitQ = 50, cursor: CursorQ = None,
                format: str | None = None) -> Page[ModelOut]:
    rows, nxt = page(session, ModelRecord, tenant.id, limit, check_cursor(cursor), format=format)
    return Page[ModelOut](items=[ModelOut.of(r) for r in rows], next_cursor=nxt)


@router.get("/{model_id}", response_model=ModelOut, summary="One model")
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelOut:
    row = get_owned(session, ModelRecord, tenant.id, model_id)
    if row is None:
        raise not_found("model", model_id)
    return ModelOut.of(row)
