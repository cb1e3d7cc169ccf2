"""The caller's usage, its report from the ledger, and the admin endpoints that set per-user and per-org
limits."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from datetime import datetime

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.schemas import QuotaLimits, UsageReportQuery, parse_body, parse_query, refuse_unstorable
from gateway.edge.auth import Principal, principal_of
from gateway.edge.errors import Forbidden, Unavailable, ValidationFailed
from gateway.edge.responses import JSONBody
from gateway.services import Services, services_of
from storage.usage import QuotaOverride, UsageGroup, get_override, put_override, summarize_usage

SCOPES = ("user", "org")
REPORT_FIELDS = ("input_tokens", "output_tokens", "reasoning_tokens", "charged_tokens", "requests")


async def usage(request: Request) -> Response:
    principal = principal_of(request)
    services = services_of(request)
    try:
        report = await services.quotas.store.usage(principal.org_id, principal.user_id)
    except (RedisError, OSError):
        raise Unavailable("The quota store is unavailable") from None
    return JSONBody({"user_id": principal.user_id, "org_id": principal.org_id, **report})


async def usage_report(request: Request) -> Response:
    """The ledger summed over a time range by day, model or user: the org's for an admin, else the
    caller's own; CSV with ``Accept: text/csv``."""
    principal = principal_of(request)
    query = parse_query(request, UsageReportQuery)
    start, end = query.span()
    user_id = None if principal.is_admin else principal.user_id
    groups = await summarize_usage(services_of(request).pool, principal.org_id, user_id, start, end, query.group_by)
    if wants_csv(request):
        return csv_report(groups, query.group_by, start, end)
    return JSONBody({
        "scope": "org" if user_id is None else "user", "org_id": principal.org_id, "user_id": user_id,
        "from": start, "to": end, "group_by": query.group_by, "groups": [asdict(group) for group in groups],
        "totals": {field: sum(getattr(group, field) for group in groups) for field in REPORT_FIELDS},
    }, headers={"Vary": "Accept"})


def wants_csv(request: Request) -> bool:
    accepted = request.headers.get("accept", "").split(",")
    return any(kind.split(";")[0].strip().lower() == "text/csv" for kind in accepted)


def csv_report(groups: list[UsageGroup], group_by: str, start: datetime, end: datetime) -> Response:
    """The groups as RFC 4180 CSV: a header row (the grouping, then the sums), then a row a group."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([group_by, *REPORT_FIELDS])
    writer.writerows([group.key, *(getattr(group, field) for field in REPORT_FIELDS)] for group in groups)
    name = f"usage-by-{group_by}-{start:%Y%m%d}-{end:%Y%m%d}.csv"
    return Response(out.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"', "Vary": "Accept"})


def admin_target(request: Request) -> tuple[Principal, str, str]:
    """The admin caller, and the scope and subject it may manage: users of its own org, or the org itself."""
    principal = principal_of(request)
    scope, subject_id = request.path_params["scope"], request.path_params["subject_id"]
    if scope not in SCOPES:
        raise ValidationFailed(details=[{"loc": ["scope"], "msg": "must be 'user' or 'org'", "type": "enum"}])
    if not principal.is_admin:
        raise Forbidden("Only an admin of the org may manage quotas")
    if scope == "org" and subject_id != principal.org_id:
        raise Forbidden("An admin manages only its own org")
    if not 0 < len(subject_id) <= 200:
        raise ValidationFailed(details=[{"loc": ["subject_id"], "msg": "1 to 200 characters", "type": "length"}])
    refuse_unstorable(subject_id, ["subject_id"])  # a NUL PostgreSQL cannot store is a 422, not a 500
    return principal, scope, subject_id


def quota_body(services: Services, scope: str, subject_id: str, override: QuotaOverride | None) -> dict[str, object]:
    settings = services.settings
    defaults = {
        "tokens_per_period": settings.quota_user_tokens if scope == "user" else settings.quota_org_tokens,
        "period": settings.quota_period,
        "requests_per_minute": settings.quota_requests_per_minute if scope == "user"
        else settings.quota_org_requests_per_minute,
        "max_concurrent_streams": settings.quota_max_concurrent_streams if scope == "user" else None,
    }
    return {"scope": scope, "subject_id": subject_id,
            **(asdict(override) if override else {k: None for k in defaults} | {"period": defaults["period"]}),
            "overridden": override is not None, "defaults": defaults}


async def get_quota(request: Request) -> Response:
    principal, scope, subject_id = admin_target(request)
    services = services_of(request)
    override = await get_override(services.pool, principal.org_id, scope, subject_id)
    return JSONBody(quota_body(services, scope, subject_id, override))


async def put_quota(request: Request) -> Response:
    principal, scope, subject_id = admin_target(request)
    body = await parse_body(request, QuotaLimits)
    services = services_of(request)
    override = QuotaOverride(body.tokens_per_period, body.period, body.requests_per_minute,
                             body.max_concurrent_streams)
    await put_override(services.pool, principal.org_id, scope, subject_id, override)
    try:
        await services.quotas.store.forget_limits(principal.org_id, scope, subject_id)
    except (RedisError, OSError):
        raise Unavailable("Saved, but the quota cache could not be refreshed; it expires on its own") from None
    return JSONBody(quota_body(services, scope, subject_id, override))


routes = [
    Route("/v1/usage", usage, methods=["GET"]),
    Route("/v1/usage/report", usage_report, methods=["GET"]),
    Route("/v1/admin/quotas/{scope}/{subject_id}", get_quota, methods=["GET"]),
    Route("/v1/admin/quotas/{scope}/{subject_id}", put_quota, methods=["PUT"]),
]
