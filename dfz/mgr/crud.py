"""The REST API's one way of listing, reading, creating, changing and deleting a resource.

A :class:`Resource` describes a table and its API: its schemas, its permission group, its many-to-many
links, and the few rules of its own (hooks). :func:`router` turns it into five endpoints under
``/api/v1/<path>``; every resource behaves alike:

* ``GET    /<path>?page=&per_page=&<filters>`` → a :class:`~dfz.mgr.schemas.Page`, in id order;
* ``GET    /<path>/{id}``, ``POST /<path>`` (201), ``PATCH /<path>/{id}`` (only the fields sent),
  ``DELETE /<path>/{id}`` (204);
* 404 for an unknown id; 422 for invalid input, including a reference to a row that does not exist;
  409 for a duplicate (a name that exists) or a row still in use (a cluster that has schedulers);
* each change adds an audit entry (:mod:`dfz.mgr.audit`) in its own transaction;
* **tenants**: for a confined principal (:attr:`~dfz.mgr.auth.Principal.confined`) a resource that carries a
  tenant (``tenant_field``, or a ``confine`` clause) has only its tenant's rows: the others are not listed
  and answer 404 (their existence is not confirmed); a row it creates is in its tenant (another tenant
  named: 403), and it cannot move a row to another tenant (403). A resource of no tenant whose ``confine``
  says which rows such a principal sees (tenants: its own) cannot be created by it.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations, which are the
resource's schema classes, at run time.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, func, select

from . import audit
from .auth import Principal, requires
from .db import Database
from .models import utcnow
from .schemas import ListQuery, Page, Partial, Problem

Values = dict[str, Any]
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The resource's id")]


@dataclass(frozen=True)
class Link:
    """A many-to-many link shown as a list of ids (``field``) on the resource: rows of ``table`` whose
    ``own`` column is the resource's id and whose ``other`` column is an id in ``other_table``."""

    field: str
    table: type[SQLModel]
    own: str
    other: str
    other_table: type[SQLModel]
    writable: bool = True


Hook = Callable[[Session, Principal, Values, Any], None]


@dataclass
class Resource:
    path: str
    """URL segment, plural: ``scheduler-clusters``."""
    kind: str
    """Audit ``resource_type``: ``scheduler_cluster``."""
    title: str
    """In messages: ``scheduler cluster``."""
    table: type[SQLModel]
    group: str
    read: type[BaseModel]
    filter: type[ListQuery]
    create: type[BaseModel] | None = None
    update: type[Partial] | None = None
    deletable: bool = True
    links: tuple[Link, ...] = ()
    prepare: Hook | None = None
    """Called before a create (row None) or an update (the row) with the values to write, which it may
    change; raises HTTPException to refuse."""
    before_delete: Callable[[Session, Principal, Any], None] | None = None
    present: Callable[[Values], Values] | None = None
    """Turns a row's values into what the API shows (e.g. hides a secret)."""
    filters: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    """Filters that are not a plain ``column == value``: name → value → where clause."""
    tenant_field: str | None = None
    """The column naming the tenant a row belongs to (confined principals: only theirs, see the module)."""
    confine: Callable[[Principal], Any] | None = None
    """The rows a confined principal sees, as a where clause; default ``tenant_field == its tenant``."""


def confinement(spec: Resource, principal: Principal | None) -> Any | None:
    """The where clause that confines ``principal`` to its tenant's rows of ``spec``; None: no confinement."""
    if principal is None or not principal.confined:
        return None
    if spec.confine is not None:
        return spec.confine(principal)
    if spec.tenant_field is not None:
        return _columns(spec.table)[spec.tenant_field] == principal.tenant
    return None


def _confine_values(spec: Resource, principal: Principal, values: Values, row: Any | None) -> None:
    """403 when a confined principal would make a row outside its tenant; a new row's tenant defaults to its own."""
    if not principal.confined or confinement(spec, principal) is None:
        return
    name = spec.tenant_field
    if name is None:
        if row is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"a user confined to a tenant cannot create a {spec.title}")
        return
    if principal.tenant_id is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role!r} without a tenant changes no {spec.title}")
    if row is None and values.get(name) is None:
        values[name] = principal.tenant_id
    elif name in values and values[name] != principal.tenant_id:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"{name}: you are confined to tenant {principal.tenant_id}, not {values[name]}"
        )


TITLES: dict[str, str] = {}
"""Table name → title, for messages about references (filled by :func:`router`)."""


def _title(table: sa.Table) -> str:
    return TITLES.get(table.name, table.name)


def _columns(table: type[SQLModel]) -> sa.ColumnCollection[str, sa.Column[Any]]:
    return table.__table__.columns  # type: ignore[attr-defined,no-any-return]


def _row_values(row: SQLModel) -> Values:
    return {c.name: getattr(row, c.name) for c in _columns(type(row))}


def get_or_404(session: Session, spec: Resource, row_id: int, principal: Principal | None = None) -> Any:
    """The row, as ``principal`` may see it (another tenant's row is "not found" to a confined principal)."""
    row = session.get(spec.table, row_id)
    clause = confinement(spec, principal)
    if row is not None and clause is not None:
        row = session.exec(select(spec.table).where(_columns(spec.table)["id"] == row_id, clause)).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {spec.title} with id {row_id}")
    return row


def _link_ids(session: Session, link: Link, ids: Sequence[int]) -> dict[int, list[int]]:
    if not ids:
        return {}
    own, other = getattr(link.table, link.own), getattr(link.table, link.other)
    found: dict[int, list[int]] = {i: [] for i in ids}
    for a, b in session.exec(select(own, other).where(own.in_(ids)).order_by(own, other)):
        found[a].append(b)
    return found


def to_read(session: Session, spec: Resource, rows: Sequence[Any]) -> list[BaseModel]:
    ids = [row.id for row in rows]
    links = {link.field: _link_ids(session, link, ids) for link in spec.links}
    out = []
    for row in rows:
        values = _row_values(row)
        for name, by_id in links.items():
            values[name] = by_id.get(row.id, [])
        if spec.present is not None:
            values = spec.present(values)
        out.append(spec.read.model_validate(values))
    return out


def list_page(session: Session, spec: Resource, query: ListQuery, principal: Principal | None = None) -> Page[Any]:
    stmt = select(spec.table)
    columns = _columns(spec.table)
    clause = confinement(spec, principal)
    if clause is not None:
        stmt = stmt.where(clause)
    for name, value in query.model_dump(exclude={"page", "per_page"}, exclude_none=True).items():
        custom = spec.filters.get(name)
        stmt = stmt.where(custom(value) if custom is not None else columns[name] == value)
    total = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    rows = session.exec(stmt.order_by(columns["id"]).offset((query.page - 1) * query.per_page).limit(query.per_page)).all()
    return Page(items=to_read(session, spec, rows), total=total, page=query.page, per_page=query.per_page)


def check_references(session: Session, table: type[SQLModel], values: Values) -> None:
    """422 when a value of a foreign-key column names a row that does not exist."""
    columns = _columns(table)
    for name, value in values.items():
        if value is None or name not in columns:
            continue
        for fk in columns[name].foreign_keys:
            target = fk.column
            if session.exec(select(target).where(target == value)).first() is None:
                raise HTTPException(422, f"{name}: there is no {_title(target.table)} with id {value}")


def _check_link_targets(session: Session, link: Link, ids: Iterable[int]) -> None:
    wanted = set(ids)
    if not wanted:
        return
    target = _columns(link.other_table)["id"]
    found = set(session.exec(select(target).where(target.in_(wanted))).all())
    missing = sorted(wanted - found)
    if missing:
        title = _title(link.other_table.__table__)  # type: ignore[attr-defined]
        raise HTTPException(422, f"{link.field}: there is no {title} with id {', '.join(map(str, missing))}")


def check_unique(session: Session, spec: Resource, values: Values, row: Any | None) -> None:
    """409 when ``values`` (merged into ``row`` for an update) would duplicate a unique key of another row."""
    table: sa.Table = spec.table.__table__  # type: ignore[attr-defined]
    merged = {**(_row_values(row) if row is not None else {}), **values}
    for constraint in table.constraints:
        if not isinstance(constraint, sa.UniqueConstraint):
            continue
        names = [c.name for c in constraint.columns]
        if not any(n in values for n in names) or any(merged.get(n) is None for n in names):
            continue
        stmt = select(table.c.id).where(*(table.c[n] == merged[n] for n in names))
        if row is not None:
            stmt = stmt.where(table.c.id != row.id)
        other = session.exec(stmt).first()
        if other is not None:
            what = ", ".join(f"{n}={merged[n]!r}" for n in names)
            raise HTTPException(status.HTTP_409_CONFLICT, f"a {spec.title} with {what} exists already (id {other})")


def check_not_referenced(session: Session, spec: Resource, row_id: int) -> None:
    """409 when rows of other tables still point at this one through a foreign key that does not cascade."""
    table: sa.Table = spec.table.__table__  # type: ignore[attr-defined]
    for other in SQLModel.metadata.sorted_tables:
        for fk in other.foreign_keys:
            if fk.column.table is not table or (fk.ondelete or "").upper() in ("CASCADE", "SET NULL"):
                continue
            count = session.exec(select(func.count()).select_from(other).where(fk.parent == row_id)).one()
            if count:
                raise HTTPException(
                    status.HTTP_409_CONFLICT,
                    f"{spec.title} {row_id} is still used by {count} {_title(other)}(s) ({fk.parent.name}): "
                    "delete them or point them elsewhere first",
                )


def _set_links(session: Session, spec: Resource, row_id: int, values: Values) -> None:
    for link in spec.links:
        if link.field not in values:
            continue
        own = getattr(link.table, link.own)
        session.execute(sa.delete(link.table).where(own == row_id))
        for other_id in values[link.field]:
            session.add(link.table(**{link.own: row_id, link.other: other_id}))


def _flush(session: Session, spec: Resource) -> None:
    try:
        session.flush()
    except IntegrityError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the {spec.title} conflicts with existing data: {e.orig}") from None


def create(session: Session, spec: Resource, principal: Principal, body: BaseModel) -> BaseModel:
    values = body.model_dump()
    link_values = {link.field: values.pop(link.field) for link in spec.links if link.field in values}
    _confine_values(spec, principal, values, None)
    if spec.prepare is not None:
        spec.prepare(session, principal, values, None)
    check_references(session, spec.table, values)
    for link in spec.links:
        _check_link_targets(session, link, link_values.get(link.field, ()))
    check_unique(session, spec, values, None)
    row = spec.table(**values)
    session.add(row)
    _flush(session, spec)
    _set_links(session, spec, row.id, link_values)  # type: ignore[attr-defined]
    _flush(session, spec)
    shown = to_read(session, spec, [row])[0]
    audit.record(session, principal.actor, "create", spec.kind, row.id, shown.model_dump())  # type: ignore[attr-defined]
    return shown


def update(session: Session, spec: Resource, principal: Principal, row_id: int, body: Partial) -> BaseModel:
    row = get_or_404(session, spec, row_id, principal)
    before = to_read(session, spec, [row])[0].model_dump()
    values = body.changes()
    link_values = {link.field: values.pop(link.field) for link in spec.links if link.field in values}
    _confine_values(spec, principal, values, row)
    if spec.prepare is not None:
        spec.prepare(session, principal, values, row)
    check_references(session, spec.table, values)
    for link in spec.links:
        _check_link_targets(session, link, link_values.get(link.field, ()))
    check_unique(session, spec, values, row)
    for name, value in values.items():
        setattr(row, name, value)
    session.add(row)
    _flush(session, spec)
    _set_links(session, spec, row_id, link_values)
    _flush(session, spec)
    session.refresh(row)
    after = to_read(session, spec, [row])[0].model_dump()
    changed = audit.diff(before, after)
    changed.pop("updated_at", None)
    if changed or "password_hash" in values:
        row.updated_at = utcnow()
        if "password_hash" in values:
            changed["password"] = {"from": audit.REDACTED, "to": audit.REDACTED}
        audit.record(session, principal.actor, "update", spec.kind, row_id, changed)
    return to_read(session, spec, [row])[0]


def delete(session: Session, spec: Resource, principal: Principal, row_id: int) -> None:
    row = get_or_404(session, spec, row_id, principal)
    if spec.before_delete is not None:
        spec.before_delete(session, principal, row)
    check_not_referenced(session, spec, row_id)
    shown = to_read(session, spec, [row])[0]
    session.delete(row)
    _flush(session, spec)
    audit.record(session, principal.actor, "delete", spec.kind, row_id, shown.model_dump())


def database(request: Request) -> Database:
    db = request.app.state.db
    assert isinstance(db, Database)
    return db


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Not signed in, or the token is unknown, expired or revoked"},
    403: {"model": Problem, "description": "The role or the token's scopes do not allow it"},
}


def _annotate(endpoint: Callable[..., Any], **annotations: Any) -> None:
    """Give ``endpoint`` its parameters' types (the resource's classes, known only here)."""
    endpoint.__annotations__.update(annotations)


def router(spec: Resource) -> APIRouter:
    """The resource's endpoints (see the module's docstring)."""
    TITLES[str(spec.table.__tablename__)] = spec.title
    api = APIRouter(prefix=f"/{spec.path}", tags=[spec.path])
    read_dep = requires(spec.group, "read")
    write_dep = requires(spec.group, "write")
    plural = spec.path.replace("-", " ")

    def list_items(request: Request, query: Any, principal: Any) -> Any:
        with database(request).reading() as session:
            return list_page(session, spec, query, principal)

    _annotate(list_items, query=Annotated[spec.filter, Query()], principal=Annotated[Principal, Depends(read_dep)])
    page: Any = Page[spec.read]  # type: ignore[name-defined]
    api.add_api_route("", list_items, methods=["GET"], response_model=page, summary=f"List {plural}", responses=ERRORS)

    def get_item(request: Request, row_id: RowId, principal: Any) -> Any:
        with database(request).reading() as session:
            return to_read(session, spec, [get_or_404(session, spec, row_id, principal)])[0]

    _annotate(get_item, principal=Annotated[Principal, Depends(read_dep)])
    api.add_api_route(
        "/{row_id}",
        get_item,
        methods=["GET"],
        response_model=spec.read,
        summary=f"Get a {spec.title}",
        responses={**ERRORS, 404: {"model": Problem}},
    )

    if spec.create is not None:

        def create_item(request: Request, body: Any, principal: Any) -> Any:
            with database(request).writing() as session:
                return create(session, spec, principal, body)

        _annotate(create_item, body=spec.create, principal=Annotated[Principal, Depends(write_dep)])
        api.add_api_route(
            "",
            create_item,
            methods=["POST"],
            status_code=status.HTTP_201_CREATED,
            response_model=spec.read,
            summary=f"Create a {spec.title}",
            responses={**ERRORS, 409: {"model": Problem}},
        )

    if spec.update is not None:

        def update_item(request: Request, row_id: RowId, body: Any, principal: Any) -> Any:
            with database(request).writing() as session:
                return update(session, spec, principal, row_id, body)

        _annotate(update_item, body=spec.update, principal=Annotated[Principal, Depends(write_dep)])
        api.add_api_route(
            "/{row_id}",
            update_item,
            methods=["PATCH"],
            response_model=spec.read,
            summary=f"Change a {spec.title} (only the fields sent)",
            responses={**ERRORS, 404: {"model": Problem}, 409: {"model": Problem}},
        )

    if spec.deletable:

        def delete_item(request: Request, row_id: RowId, principal: Any) -> Response:
            with database(request).writing() as session:
                delete(session, spec, principal, row_id)
            return Response(status_code=status.HTTP_204_NO_CONTENT)

        _annotate(delete_item, principal=Annotated[Principal, Depends(write_dep)])
        api.add_api_route(
            "/{row_id}",
            delete_item,
            methods=["DELETE"],
            status_code=status.HTTP_204_NO_CONTENT,
            response_class=Response,
            summary=f"Delete a {spec.title}",
            responses={**ERRORS, 404: {"model": Problem}, 409: {"model": Problem}},
        )
    return api
