"""GET /v1/usage/report over real HTTP and PostgreSQL: the ledger's own sums, read through an index, the org
for an admin and only themself for a member, as JSON or CSV, and a clear 422 for a bad range."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from gateway.api import openapi
from gateway.api.schemas import month_start
from storage.db import Pool
from storage.queries import SQL
from storage.usage import UsageEntry, record_usage
from tests.conftest import auth_headers

ORG = f"org-busy-{uuid.uuid4().hex[:6]}"
ROWS, USERS, MODELS = 100_000, 50, 7
MARCH = {"from": "2025-03-01", "to": "2025-04-01"}
START, END = datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)
SUMS = ("input_tokens", "output_tokens", "reasoning_tokens", "charged_tokens", "requests")
# The ledger's own sums, written apart from the report's queries: the key of each grouping, then the sums.
DIRECT_KEYS = {"day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "model": "model", "user": "user_id"}
DIRECT_SUMS = ("sum(input_tokens), sum(output_tokens), coalesce(sum(reasoning_tokens), 0), sum(charged_tokens), "
               "count(*)")
ADMIN, MEMBER = auth_headers("boss", ORG, role="admin"), auth_headers("user-7", ORG)


@pytest.fixture(scope="module")
async def busy_org(db: Pool) -> str:
    """March 2025 of an org: 100,000 ledger rows of 50 users and 7 models, one at the very start of the
    month, plus a row just before it and one at the start of April. The org is one of many, as in a real
    ledger: 400,000 rows of 20 other orgs share its month. (Of a ledger it had to itself, reading the whole
    table would be the best plan; at a third of it, the planner still reckons so.)"""
    await db.execute(
        "INSERT INTO usage_ledger (org_id, user_id, model, input_tokens, output_tokens, reasoning_tokens,"
        " charged_tokens, estimated, kind, created_at)"
        " SELECT $1, 'user-' || i % $2, 'fake/model-' || i % $3, i % 1000, i % 500,"
        "        CASE WHEN i % 3 = 0 THEN i % 100 END, i % 1500, false,"
        "        CASE WHEN i % 10 = 0 THEN 'title' ELSE 'chat' END, $4::timestamptz + i * interval '26.78 s'"
        " FROM generate_series(0, $5 - 1) AS i", ORG, USERS, MODELS, START, ROWS)
    await db.execute(
        "INSERT INTO usage_ledger (org_id, user_id, model, input_tokens, output_tokens, charged_tokens, estimated,"
        " created_at) SELECT 'org-other-' || i % 20, 'user-' || i % 50, 'fake/echo', 1, 1, 2, false,"
        " $1::timestamptz + i * interval '6.69 s' FROM generate_series(0, 399999) AS i", START)
    for moment in (START - timedelta(microseconds=1), END):
        await db.execute("INSERT INTO usage_ledger (org_id, user_id, model, input_tokens, output_tokens,"
                         " charged_tokens, estimated, created_at) VALUES ($1, 'user-7', 'fake/edge', 5, 5, 10,"
                         " false, $2)", ORG, moment)
    await db.execute("VACUUM ANALYZE usage_ledger")  # what autovacuum does after so many inserts
    return ORG


async def direct_sums(db: Pool, group_by: str, user_id: str | None = None, org_id: str = ORG) -> list[dict[str, Any]]:
    where = "org_id = $1 AND created_at >= $2 AND created_at < $3" + (" AND user_id = $4" if user_id else "")
    rows = await db.fetch(f"SELECT {DIRECT_KEYS[group_by]}, {DIRECT_SUMS} FROM usage_ledger WHERE {where}"
                          " GROUP BY 1 ORDER BY 1", org_id, START, END, *([user_id] if user_id else []))
    return [dict(zip(("key", *SUMS), row, strict=True)) for row in rows]


def totals(groups: list[dict[str, Any]]) -> dict[str, int]:
    return {name: sum(group[name] for group in groups) for name in SUMS}


async def report(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> dict[str, Any]:
    response = await client.get("/v1/usage/report", headers=headers, params=params)
    assert response.status_code == 200, response.text
    openapi.LedgerReport.model_validate(response.json())  # what the description says, no field more
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("group_by", ["day", "model", "user"])
async def test_each_grouping_sums_to_what_the_ledger_holds(
    client: httpx.AsyncClient, db: Pool, busy_org: str, group_by: str
) -> None:
    body = await report(client, ADMIN, **MARCH, group_by=group_by)
    expected = await direct_sums(db, group_by)
    assert body["groups"] == expected
    assert len(expected) == {"day": 31, "model": MODELS, "user": USERS}[group_by]
    assert body["totals"] == totals(expected) and body["totals"]["requests"] == ROWS  # neither edge row
    assert (body["scope"], body["org_id"], body["user_id"], body["group_by"]) == ("org", ORG, None, group_by)
    assert (datetime.fromisoformat(body["from"]), datetime.fromisoformat(body["to"])) == (START, END)


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in plan_nodes(child))]


async def report_plan(db: Pool, scope: str, group_by: str) -> list[dict[str, Any]]:
    """The plan of the report's own query for March with the test's parameters, planned as the report
    plans it: for those values."""
    args: list[Any] = [ORG, START, END, *(["user-7"] if scope == "user" else [])]
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(SQL["plan_for_the_values"])
        explained = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {SQL[f'usage_report_{scope}_by_{group_by}']}", *args)
    plans = orjson.loads(explained) if isinstance(explained, str) else explained
    return plan_nodes(plans[0]["Plan"])


@pytest.mark.parametrize("group_by", ["day", "model", "user"])
@pytest.mark.parametrize(("scope", "index", "scans"), [
    ("org", "usage_ledger_org_time", {"Index Only Scan"}),
    ("user", "usage_ledger_owner_time", {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}),
])
async def test_the_report_reads_an_index_not_the_table(
    db: Pool, busy_org: str, scope: str, index: str, scans: set[str], group_by: str
) -> None:
    nodes = await report_plan(db, scope, group_by)
    assert not [node for node in nodes if node["Node Type"] == "Seq Scan"], nodes
    used = {node["Node Type"] for node in nodes if node.get("Index Name") == index}
    assert used and used <= scans, nodes


async def test_an_admin_sees_the_org_and_a_member_only_themself(
    client: httpx.AsyncClient, db: Pool, busy_org: str
) -> None:
    by_user = await report(client, MEMBER, **MARCH, group_by="user")
    by_model = await report(client, MEMBER, **MARCH, group_by="model")
    elsewhere = await report(client, auth_headers("boss", "org-elsewhere", role="admin"), **MARCH)
    assert (by_user["scope"], by_user["user_id"]) == ("user", "user-7")
    assert by_user["groups"] == await direct_sums(db, "user", "user-7")
    assert [group["key"] for group in by_user["groups"]] == ["user-7"]
    assert by_model["groups"] == await direct_sums(db, "model", "user-7")
    assert by_model["totals"]["requests"] == ROWS // USERS
    assert elsewhere["groups"] == [] and elsewhere["totals"] == dict.fromkeys(SUMS, 0)
    assert (await client.get("/v1/usage/report")).status_code == 401


async def test_the_report_as_csv(client: httpx.AsyncClient, busy_org: str) -> None:
    response = await client.get("/v1/usage/report", params={**MARCH, "group_by": "model"},
                                headers={**ADMIN, "Accept": "text/csv"})
    as_json = await report(client, ADMIN, **MARCH, group_by="model")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="usage-by-model-20250301-20250401.csv"'
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["model", *SUMS]
    assert rows[1:] == [[group["key"], *(str(group[name]) for name in SUMS)] for group in as_json["groups"]]
    assert response.text.endswith("\r\n")


async def test_from_and_to_take_an_offset_or_a_date(client: httpx.AsyncClient, db: Pool, busy_org: str) -> None:
    by_date = await report(client, ADMIN, **MARCH)
    by_offset = await report(client, ADMIN, **{"from": "2025-03-01T02:00:00+02:00", "to": "2025-03-31T19:00:00-05:00"})
    hour = await report(client, ADMIN, **{"from": "2025-03-10T12:00:00Z", "to": "2025-03-10T13:00:00.000001Z"})
    assert by_offset["groups"] == by_date["groups"]
    assert by_offset["from"] == by_date["from"] and datetime.fromisoformat(by_offset["to"]) == END
    start, end = datetime(2025, 3, 10, 12, tzinfo=UTC), datetime(2025, 3, 10, 13, 0, 0, 1, tzinfo=UTC)
    expected = await db.fetchval("SELECT count(*) FROM usage_ledger WHERE org_id = $1 AND created_at >= $2"
                                 " AND created_at < $3", ORG, start, end)
    assert hour["totals"]["requests"] == expected > 0


async def test_the_range_is_the_current_utc_month_by_default(client: httpx.AsyncClient, db: Pool) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    this_month, next_month = month_start(datetime.now(UTC)), month_start(datetime.now(UTC), 1)
    for moment in (this_month - timedelta(microseconds=1), this_month, next_month):
        await db.execute("INSERT INTO usage_ledger (org_id, user_id, model, input_tokens, output_tokens,"
                         " charged_tokens, estimated, created_at) VALUES ($1, 'u', 'fake/echo', 1, 2, 3, false, $2)",
                         org, moment)
    admin = auth_headers("boss", org, role="admin")
    current = await report(client, admin)
    from_only = await report(client, admin, **{"from": "2025-03-10"})
    assert [datetime.fromisoformat(current[name]) for name in ("from", "to")] == [this_month, next_month]
    assert current["totals"]["requests"] == 1
    assert from_only["from"].startswith("2025-03-10T00:00:00") and from_only["to"].startswith("2025-04-01T00:00:00")


async def test_reasoning_tokens_recorded_in_the_ledger_are_reported(client: httpx.AsyncClient, db: Pool) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    for reasoning in (7, None):
        await record_usage(db, UsageEntry(org, "u", None, None, "fake/think", 3, 10, 13, False,
                                          reasoning_tokens=reasoning))
    body = await report(client, auth_headers("u", org), group_by="model")
    assert body["groups"] == [{"key": "fake/think", "input_tokens": 6, "output_tokens": 20, "reasoning_tokens": 7,
                               "charged_tokens": 26, "requests": 2}]


async def test_a_leap_year_366_days_is_the_longest_range(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/usage/report", headers=MEMBER,
                             params={"from": "2024-01-01", "to": "2025-01-01"})).status_code == 200


@pytest.mark.parametrize(("query", "loc"), [
    ("from=2025-04-01&to=2025-03-01", "to"),  # to before from
    ("from=2024-01-01&to=2025-01-02", "to"),  # over 366 days
    ("to=2000-01-01", "to"),  # before the default from, this month
    ("from=2025-03-01T00:00:00", "from"),  # no offset
    ("from=2025-03-01T00:00:00+01:00", "from"),  # a + not encoded: a space
    ("from=yesterday", "from"),
    ("to=2025-02-30", "to"),
    ("from=0001-01-01T00:00:00%2B01:00", "from"),  # before the calendar in UTC
    ("from=%D9%A2%D9%A0%D9%A2%D9%A5-03-01", "from"),  # digits of another script
    ("group_by=week", "group_by"),
])
async def test_a_bad_range_or_grouping_is_a_422_naming_it(client: httpx.AsyncClient, query: str, loc: str) -> None:
    response = await client.get(f"/v1/usage/report?{query}", headers=ADMIN)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and [detail["loc"] for detail in error["details"]] == [[loc]]
