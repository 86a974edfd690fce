"""The open API: ``/oapi/v1/jobs``, the request and answer shapes of Dragonfly's manager, so that programs
written for Dragonfly (Harbor's Dragonfly preheat provider) drive dfz.

* ``POST /oapi/v1/jobs`` takes ``{"type": "preheat", "args": {...}, "scheduler_cluster_ids": [...]}``;
  for a preheat ``args`` is :class:`~dfz.mgr.schemas.PreheatArgs` (``type`` file or image, ``url`` or ``urls``,
  ``scope``, ``ips``/``count``/``percentage``, ``headers``, ``username``/``password``, ``platform``,
  ``tag``, ``application``, ``filtered_query_params``, ``piece_length``, ``timeout``); for ``get_task`` and
  ``delete_task`` it is :class:`~dfz.mgr.schemas.TaskArgs` (``task_id``, or ``url`` with ``tag``,
  ``application``, ``filtered_query_params``, ``piece_length``; ``timeout``). ``timeout`` is in
  **nanoseconds**, as Go's ``time.Duration`` encodes in JSON (Harbor and Dragonfly's clients send that):
  1 s to 24 h. As Dragonfly's clients send them, ``null`` values and a ``timeout`` of 0 (Go's zero value)
  count as absent, and the camel-case spellings ``filteredQueryParams``, ``pieceLength`` and ``taskID`` are
  taken too. The job is created ``pending`` (``jobs.py`` runs it) and answered ``200`` (Dragonfly's status)
  with the job.
* ``GET /oapi/v1/jobs/{id}`` and ``GET /oapi/v1/jobs`` (``page``, ``per_page``, ``type``, ``state``:
  a JSON array, as Dragonfly answers) show jobs with ``state`` in Dragonfly's words: ``PENDING`` (pending
  or running), ``SUCCESS``, ``FAILURE`` (failed or cancelled); dfz's own state is ``dfz_state``. The
  ``result`` is the runner's (Dragonfly's ``job_states`` and dfz's ``tasks``). Passwords and
  ``Authorization`` headers are shown as ``***``.
* ``Authorization: Bearer <personal access token>`` whose scopes (and user's role) allow ``job``: 401
  without a valid token, 403 without the scope, 422 for a request of the wrong shape.
"""

# No ``from __future__ import annotations``: FastAPI reads the annotations at run time.
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict
from sqlmodel import col, select

from . import audit, crud
from .auth import Principal, requires
from .models import Job, SchedulerCluster
from .resources import JOBS
from .schemas import Bio, IdList, JobCreate, Problem

OAPI_PREFIX = "/oapi/v1"
DRAGONFLY_STATES = {
    "pending": "PENDING",
    "running": "PENDING",
    "succeeded": "SUCCESS",
    "failed": "FAILURE",
    "cancelled": "FAILURE",
}
_CAMEL = {"filteredQueryParams": "filtered_query_params", "pieceLength": "piece_length", "taskID": "task_id"}
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem}}


class OapiJobCreate(BaseModel):
    """Dragonfly's ``CreateJobRequest``; ``user_id``, ``result`` and ``seed_peer_cluster_ids`` are taken and
    ignored (the job belongs to the token's user; seed-peer clusters follow from the scheduler clusters)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["preheat", "get_task", "delete_task"]
    args: dict[str, Any]
    bio: Bio | None = ""
    scheduler_cluster_ids: IdList | None = None
    seed_peer_cluster_ids: list[int] | None = None
    user_id: int | None = None
    result: dict[str, Any] | None = None


def _args(raw: dict[str, Any]) -> dict[str, Any]:
    return {_CAMEL.get(k, k): v for k, v in raw.items() if v is not None and not (k == "timeout" and v == 0)}


def _shown_args(args: dict[str, Any]) -> dict[str, Any]:
    shown = audit.redact(args)
    headers = shown.get("headers")
    if isinstance(headers, dict):
        shown["headers"] = {
            k: ("***" if k.lower() in ("authorization", "proxy-authorization") else v) for k, v in headers.items()
        }
    return dict(shown)


def present(job: Any, clusters: dict[int, SchedulerCluster]) -> dict[str, Any]:
    """A job (a :class:`~dfz.mgr.schemas.JobRead`) in Dragonfly's shape."""
    return {
        "id": job.id,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "bio": job.bio,
        "type": job.type,
        "state": DRAGONFLY_STATES.get(job.state, "PENDING"),
        "dfz_state": job.state,
        "args": _shown_args(job.args),
        "result": job.result,
        "error": job.error,
        "user_id": job.user_id,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "scheduler_clusters": [
            {"id": c.id, "name": c.name, "created_at": c.created_at, "updated_at": c.updated_at}
            for c in (clusters.get(i) for i in job.scheduler_cluster_ids)
            if c is not None
        ],
    }


def _clusters(session: Any) -> dict[int, SchedulerCluster]:
    return {c.id: c for c in session.exec(select(SchedulerCluster)) if c.id is not None}


def router() -> APIRouter:
    api = APIRouter(prefix=f"{OAPI_PREFIX}/jobs", tags=["open API"])
    reader = requires("job", "read")
    writer = requires("job", "write")

    @api.post(
        "",
        summary="Create a job (Dragonfly's open API): preheat a file or an image, find or delete a task",
        description="`args.timeout` is in nanoseconds (Go's time.Duration): 1 s to 24 h; 0 or null: the default.",
        responses={**ERRORS, 422: {"model": Problem}},
    )
    def create_job(request: Request, body: OapiJobCreate, principal: Annotated[Principal, Depends(writer)]) -> dict[str, Any]:
        try:
            job = JobCreate(
                type=body.type, args=_args(body.args), bio=body.bio or "", scheduler_cluster_ids=body.scheduler_cluster_ids or []
            )
        except ValueError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, _reason(e)) from None
        with crud.database(request).writing() as session:
            shown = crud.create(session, JOBS, principal, job)
            return present(shown, _clusters(session))

    @api.get("/{row_id}", summary="A job (Dragonfly's open API)", responses=ERRORS)
    def get_job(request: Request, row_id: crud.RowId, principal: Annotated[Principal, Depends(reader)]) -> dict[str, Any]:
        with crud.database(request).reading() as session:
            row = crud.get_or_404(session, JOBS, row_id, principal)
            return present(crud.to_read(session, JOBS, [row])[0], _clusters(session))

    @api.get("", summary="Jobs, newest first (Dragonfly's open API: a JSON array)", responses=ERRORS)
    def list_jobs(
        *,
        request: Request,
        principal: Annotated[Principal, Depends(reader)],
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=1000)] = 10,
        type: Annotated[Literal["preheat", "get_task", "delete_task"] | None, Query()] = None,
        state: Annotated[Literal["PENDING", "SUCCESS", "FAILURE"] | None, Query()] = None,
    ) -> list[dict[str, Any]]:
        query = select(Job).order_by(col(Job.id).desc()).offset((page - 1) * per_page).limit(per_page)
        if type is not None:
            query = query.where(Job.type == type)
        if state is not None:
            query = query.where(col(Job.state).in_([k for k, v in DRAGONFLY_STATES.items() if v == state]))
        clause = crud.confinement(JOBS, principal)
        if clause is not None:
            query = query.where(clause)
        with crud.database(request).reading() as session:
            rows = list(session.exec(query))
            clusters = _clusters(session)
            return [present(i, clusters) for i in crud.to_read(session, JOBS, rows)]

    return api


def _reason(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', '')}" if where else str(err.get("msg", "")))
        return "; ".join(parts)[:1000]
    return str(e)[:1000]
