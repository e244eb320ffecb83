"""`GET /v1/accelerators`: the built-in target profiles a job may name."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import TenantDep
from api.schemas import AcceleratorOut
from pruning_core.accelerators import BUILTIN_PROFILES

router = APIRouter(prefix="/v1/accelerators", tags=["accelerators"])


@router.get("", response_model=list[AcceleratorOut], summary="Built-in accelerator profiles")
def list_accelerators(tenant: TenantDep) -> list[AcceleratorOut]:
    return [AcceleratorOut.model_validate(p.to_dict()) for p in BUILTIN_PROFILES.values()]
