#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: app_smoke
short_description: Smoke-test an app - its health, HTTP checks, and the reader app's track-view cases
version_added: "0.3.0"
description:
  - Runs, on the target host, the health check, then (with I(track_view)) the incident runbook's four
    test cases against the reference app's HTTP API on one dedicated smoke book, then any I(extra_checks).
  - C(health) - GET I(health_path) answers I(health_status); with I(track_view) also C(status=ok);
    C(release=I(expect_release)) when set and the answer names a release (always with I(track_view)).
  - C(first view creates the row) - with I(reset), the smoke book's statistics rows are deleted first
    (only that book's); one POST of the first view type answers 200, the app's stats show 1 and the table holds
    exactly one row for (book, view type). Without I(reset) a +1 delta is asserted instead.
  - C(second view increments) - a second POST answers 200, the count is +1, still one row.
  - C(other view type has its own row) - a POST of the second view type answers 200, its count is +1,
    the first type's count is unchanged, one row for (book, second type).
  - C(N concurrent views) - I(concurrency) simultaneous POSTs of the first type (threads released
    together by a barrier) all answer 200, the count is +N exactly, still one row.
  - The first failing case stops the run; the cases after it are reported as not run (C(ok=null)).
  - Row counts and the reset use the C(psql) client (PGPASSWORD in the child's environment only);
    they are skipped when I(login_db) is not set.
  - The writes touch only the smoke book's statistics, so the module never reports a change.
options:
  url:
    description: Base URL of the app, e.g. C(http://127.0.0.1:3000).
    type: str
    required: true
  track_view:
    description: Run the reference app's track-view cases (the smoke plugin C(reader-track-view) of an
      app's slipway.yml) and expect its health answer's C(status = ok); false runs the health check and
      I(extra_checks) only.
    type: bool
    default: true
  token:
    description: The app's API token, sent in the C(Authorization) header as a Bearer token (by the
      track-view cases and the extra checks with C(auth)); required by them.
    type: str
  book_id:
    description: Id (UUID) of an existing book reserved for smoke tests; required with I(track_view).
    type: str
  view_types:
    description: Two distinct view types; the first is tracked by cases 1, 2 and 4, the second by case 3.
    type: list
    elements: str
    default: [card_view, reader_open]
  concurrency:
    description: Number of simultaneous requests of case 4.
    type: int
    default: 20
  health_status:
    description: The HTTP status the health endpoint answers when the app is healthy.
    type: int
    default: 200
  timeout:
    description: Seconds to wait for each HTTP request.
    type: float
    default: 10
  reset:
    description: Delete the smoke book's statistics rows before case 1, so exact counts are asserted.
    type: bool
    default: true
  login_host:
    description: Database host (for the reset and the row counts).
    type: str
  login_db:
    description: Database name; without it the reset and row counts are not done (I(reset) must then be false).
    type: str
  psql_bin:
    description: The psql executable.
    type: str
    default: psql
  health_path:
    description: Path of the health endpoint.
    type: str
    default: /api/health
  health_repeat:
    description: How many times the health check asks, each on a new connection; every answer must pass. PM2's
      instances share the connections, so more answers come from more of them (a deploy that reloads nothing asks
      twice per instance); it is no guarantee that each one answers.
    type: int
    default: 1
  expect_release:
    description: When set, the health endpoint's C(release) must equal it.
    type: str
  extra_checks:
    description: More HTTP checks, run after the four cases.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Name of the check in the results.
        type: str
        required: true
      method:
        description: HTTP method.
        type: str
        default: GET
      path:
        description: Path under I(url).
        type: str
        required: true
      status:
        description: Expected HTTP status.
        type: int
        default: 200
      json:
        description: Expected values of the JSON response by dotted field path (C(stats.card_view)).
        type: dict
      body:
        description: A JSON body to send.
        type: dict
      auth:
        description: Send the bearer token.
        type: bool
        default: true
extends_documentation_fragment:
  - slipway.core.postgres
author:
  - slipway developers
notes:
  - Check mode runs nothing and returns C(ok=true) with no cases.
  - Python standard library only (urllib and threads); runs with the target's system Python.
"""

EXAMPLES = r"""
- name: Smoke-test the app on the smoke book
  slipway.core.app_smoke:
    url: http://127.0.0.1:3000
    token: "{{ slipway_api_token }}"
    book_id: "{{ slipway_smoke_book_id }}"
    login_host: 127.0.0.1
    login_port: 5432
    login_user: booksuser
    login_password: "{{ slipway_db_password }}"
    login_db: booksdb
    extra_checks:
      - name: stats endpoint answers for the smoke book
        path: "/api/books/{{ slipway_smoke_book_id }}/stats"
        json: {bookId: "{{ slipway_smoke_book_id }}"}
  register: smoke
"""

RETURN = r"""
ok:
  description: Whether every case passed.
  returned: always
  type: bool
summary:
  description: Count of passed cases, e.g. C(5/5 passed).
  returned: always
  type: str
  sample: 5/5 passed
cases:
  description: One dict per case in order (name, ok, expected, got, seconds); C(ok) is null for cases not run.
  returned: always
  type: list
  elements: dict
stats:
  description: The app's stats of the smoke book after the run.
  returned: when the cases ran
  type: dict
"""

import json
import re
import threading
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.six.moves.urllib.error import URLError
from ansible_collections.slipway.core.plugins.module_utils import postgres
from ansible_collections.slipway.core.plugins.module_utils.http_client import HttpClient
from ansible_collections.slipway.core.plugins.module_utils.oneline import ELLIPSIS, one_line
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MISSING = "<missing>"
BODY_CHARS = 200


class Unreachable(Exception):
    """The app could not be reached at all (refused, timed out, DNS...)."""


class Abort(Exception):
    """A one-line failure that stops the run (missing book, rejected token, psql error); ``got``
    is what the case saw, for its row in the results."""

    def __init__(self, msg, got=None):
        super(Abort, self).__init__(msg)
        self.got = got


class Smoke(object):
    def __init__(self, module):
        self.module = module
        p = module.params
        self.p = p
        self.base = p["url"].rstrip("/")
        self.secrets = [s for s in (p["token"],) if s] + postgres.secrets(p)
        self.client = HttpClient(p["timeout"])  # the app is local to the host: never via a proxy
        self.book = p["book_id"]
        self.cases = []

    # -- output hygiene ---------------------------------------------------------------------
    def clean(self, text):
        return redact_text(text, known=self.secrets)

    # -- HTTP ---------------------------------------------------------------------------------
    def http(self, method, path, body=None, auth=True):
        """(status, parsed JSON or None, text) of one request; Unreachable when no answer came."""
        url = self.base + path
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = "Bearer " + self.p["token"]
        try:
            status, text, doc = self.client.request(url, method, body, headers)
        except URLError as exc:
            raise Unreachable("%s %s: %s" % (method.upper(), url, getattr(exc.reason, "strerror", None) or exc.reason))
        except Exception as exc:  # noqa: BLE001 - timeouts, resets: one line, no traceback
            raise Unreachable("%s %s: %s" % (method.upper(), url, exc or type(exc).__name__))
        return status, doc, text

    def show(self, status, text):
        return self.clean("HTTP %s %s" % (status, one_line(text, BODY_CHARS + len(ELLIPSIS)))).strip()

    def track(self, view_type):
        status, _, text = self.http("POST", "/api/books/%s/track-view" % self.book, {"viewType": view_type})
        if status == 404:
            raise Abort("smoke book %s does not exist in the database (the app answers 404 to track-view); "
                        "set slipway_smoke_book_id to an existing book" % self.book, self.show(status, text))
        if status == 401:
            raise Abort("the app at %s rejected the API token (HTTP 401); set slipway_api_token to the app's API_TOKEN"
                        % self.base, self.show(status, text))
        return status, text

    def stats(self):
        status, doc, text = self.http("GET", "/api/books/%s/stats" % self.book)
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("stats"), dict):
            return None, self.show(status, text)
        return doc["stats"], None

    # -- psql ---------------------------------------------------------------------------------
    @property
    def has_db(self):
        return bool(self.p["login_db"])

    def psql(self, sql, **variables):
        """Run ``sql`` (psql variables :'name' for values) and return stdout rows split on tabs."""
        p = self.p
        options = ["-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"]
        for name, value in sorted(variables.items()):
            options += ["-v", "%s=%s" % (name, value)]
        cmd = postgres.client_argv(self.module.get_bin_path(p["psql_bin"], required=True), p, options)
        env = postgres.client_env(p, connect_timeout=max(1, p["connect_timeout"]))
        env["PGAPPNAME"] = "slipway-smoke"
        rc, out, err = self.module.run_command(cmd, data=sql, environ_update=env)
        if rc != 0:
            raise Abort("psql failed on %s: %s" % (postgres.where(p), one_line(self.clean(err or out), pick="first",
                                                                              default="rc=%d" % rc)))
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def rows(self):
        """Statistics rows of the smoke book per view type (None when the database is not configured)."""
        if not self.has_db:
            return None
        found = self.psql("SELECT view_type, count(*) FROM book_view_statistics WHERE book_id = :'book' GROUP BY view_type;",
                          book=self.book)
        return dict((row[0], int(row[1])) for row in found if len(row) == 2)

    def reset(self):
        self.psql("DELETE FROM book_view_statistics WHERE book_id = :'book';", book=self.book)

    # -- cases --------------------------------------------------------------------------------
    def record(self, name, ok, expected, got, started=None):
        """The one way a case enters the results: ``ok`` True/False (None: not run), ``expected``
        and ``got`` as lists of parts (shown joined by ``; ``) or as one text, redacted, and the
        seconds since ``started`` (0 for a case that did not run)."""
        self.cases.append(dict(name=name, ok=ok, expected=self.clean(joined(expected)), got=self.clean(joined(got)),
                               seconds=round(time.time() - started, 3) if started is not None else 0.0))
        return ok

    def counts(self, view_types):
        """Stats of ``view_types`` and their row counts, as printable parts, plus the raw stats."""
        stats, problem = self.stats()
        rows = self.rows()
        parts = []
        for vt in view_types:
            parts.append("stats.%s = %s" % (vt, problem or stats.get(vt, MISSING)))
        if rows is not None:
            for vt in view_types:
                parts.append("rows(%s) = %d" % (vt, rows.get(vt, 0)))
        return parts, stats

    def want(self, values, view_types):
        parts = ["stats.%s = %s" % (vt, values[vt]) for vt in view_types]
        if self.has_db:
            parts += ["rows(%s) = 1" % vt for vt in view_types]
        return parts

    # Each case returns its verdict, (ok, expected, got), which run() records.
    def case_health(self):
        """The health status; the reference app's ``status = ok`` with its track-view cases; the
        release, when one is expected and the app names one (or is the reference app). Asked
        ``health_repeat`` times, each on a new connection: each answer must pass (PM2's instances
        share the connections, so more of them answer; not necessarily each)."""
        verdict = None
        for _ in range(max(1, self.p["health_repeat"])):
            verdict = self.health_once()
            if not verdict[0]:
                return verdict
        return verdict

    def health_once(self):
        want = self.p["health_status"]
        status, doc, text = self.http("GET", self.p["health_path"], auth=False)
        expected, got = ["HTTP %d" % want], ["HTTP %s" % status]
        if status != want and not isinstance(doc, dict):
            return False, expected, self.show(status, text)
        doc = doc if isinstance(doc, dict) else {}
        if self.p["track_view"]:
            expected.append("status = ok")
            got.append("status = %s" % doc.get("status", MISSING))
        if self.p["expect_release"] and (self.p["track_view"] or "release" in doc):
            expected.append("release = %s" % self.p["expect_release"])
            got.append("release = %s" % doc.get("release", MISSING))
        return compared(expected, got)

    def case_views(self, view_type, n, checked, reset=False):
        """POST ``view_type`` n times at once; expect every answer 200, stats of ``view_type`` +n
        (exactly 1 after a ``reset`` of the book's rows), the other ``checked`` types unchanged,
        exactly one row each."""
        if reset:
            self.reset()
        before, problem = self.stats()
        if before is None:
            return False, "GET stats: HTTP 200 with stats", problem
        after_want = dict((vt, int(before.get(vt, 0))) for vt in checked)
        after_want[view_type] = 1 if reset else after_want[view_type] + n
        expected = ["HTTP 200" + (" x%d" % n if n > 1 else "")] + self.want(after_want, checked)
        if n == 1:
            status, text = self.track(view_type)
            if status != 200:
                return False, expected, self.show(status, text)
            answers = "HTTP 200"
        else:
            answers = self.concurrent(view_type, n)
        parts, _ = self.counts(checked)
        return compared(expected, [answers] + parts)

    def concurrent(self, view_type, n):
        barrier = threading.Barrier(n)
        results = [None] * n

        def worker(i):
            try:
                barrier.wait(timeout=self.p["timeout"])
                results[i] = "HTTP %s" % self.track(view_type)[0]
            except Abort as exc:
                results[i] = str(exc)
            except Unreachable as exc:
                results[i] = "no answer (%s)" % exc
            except Exception as exc:  # noqa: BLE001 - a thread reports, it does not die silently
                results[i] = "%s: %s" % (type(exc).__name__, exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.daemon = True
            t.start()
        for t in threads:
            t.join(self.p["timeout"] * 3 + 5)
        tally = {}
        for r in results:
            tally[r or "no answer (thread still waiting)"] = tally.get(r or "no answer (thread still waiting)", 0) + 1
        return ", ".join("%s x%d" % (k, v) for k, v in sorted(tally.items(), key=lambda kv: (kv[0] != "HTTP 200", kv[0])))

    def extra(self, check):
        status, doc, text = self.http(check["method"] or "GET", check["path"], check.get("body"),
                                      auth=check["auth"] is not False)
        expected, got = ["HTTP %s" % check["status"]], ["HTTP %s" % status]
        for field, value in sorted((check.get("json") or {}).items()):
            expected.append("%s = %s" % (field, json.dumps(value)))
            got.append("%s = %s" % (field, json.dumps(lookup(doc, field))))
        ok, expected, got = compared(expected, got)
        if not ok and status != check["status"]:
            got = self.show(status, text)
        return ok, expected, got

    # -- the run ------------------------------------------------------------------------------
    def planned(self):
        a, b = self.p["view_types"][:2]
        n = self.p["concurrency"]
        first = "first view creates the row" if self.p["reset"] else "first view creates the row (no reset: +1 delta)"
        second, other, many = "second view increments", "other view type has its own row", "%d concurrent views" % n
        steps = [("health", self.case_health)]
        if self.p["track_view"]:  # the plugin reader-track-view: the incident's cases on the smoke book
            steps += [
                (first, lambda: self.case_views(a, 1, [a], reset=self.p["reset"])),
                (second, lambda: self.case_views(a, 1, [a])),
                (other, lambda: self.case_views(b, 1, [a, b])),
                (many, lambda: self.case_views(a, n, [a])),
            ]
        for check in self.p["extra_checks"]:
            steps.append((check["name"], lambda check=check: self.extra(check)))
        return steps

    def run(self):
        steps = self.planned()
        for index, (name, step) in enumerate(steps):
            started = time.time()
            try:
                passed = self.record(name, *step(), started=started)
            except (Abort, Unreachable) as exc:
                got = getattr(exc, "got", None) or self.clean(str(exc))
                expected = "HTTP 200" if got.startswith("HTTP ") else "an answer from the app and the database"
                self.record(name, False, expected, got, started)
                self.not_run(steps[index + 1:])
                raise
            if not passed:
                self.not_run(steps[index + 1:])
                break
        return steps

    def not_run(self, steps):
        for name, _ in steps:
            self.record(name, None, "", "not run")


def compared(expected, got):
    """A case's verdict: (ok, expected, got), ok when ``got`` holds exactly the ``expected`` parts."""
    return all(e == g for e, g in zip(expected, got)) and len(expected) == len(got), expected, got


def joined(parts):
    """A case's parts as one text (``a; b``); a text stays as it is."""
    return "; ".join(str(part) for part in parts) if isinstance(parts, (list, tuple)) else parts


def lookup(doc, dotted):
    """The value at a dotted path (``stats.card_view``, ``items.0.id``) of a JSON document."""
    node = doc
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type="str", required=True),
            track_view=dict(type="bool", default=True),
            token=dict(type="str", no_log=True),
            book_id=dict(type="str"),
            view_types=dict(type="list", elements="str", default=["card_view", "reader_open"]),
            concurrency=dict(type="int", default=20),
            timeout=dict(type="float", default=10.0),
            reset=dict(type="bool", default=True),
            **postgres.postgres_argument_spec(),
            psql_bin=dict(type="str", default="psql"),
            health_path=dict(type="str", default="/api/health"),
            health_status=dict(type="int", default=200),
            expect_release=dict(type="str"),
            health_repeat=dict(type="int", default=1),
            extra_checks=dict(
                type="list", elements="dict", default=[],
                options=dict(
                    name=dict(type="str", required=True),
                    method=dict(type="str", default="GET"),
                    path=dict(type="str", required=True),
                    status=dict(type="int", default=200),
                    json=dict(type="dict"),
                    body=dict(type="dict"),
                    auth=dict(type="bool", default=True),
                ),
            ),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if module.check_mode:
        module.exit_json(changed=False, skipped=True, ok=True, cases=[], summary="not run in check mode",
                         msg="not run in check mode")

    def bad(msg):
        module.fail_json(msg=msg, changed=False, ok=False, cases=[], summary="not run")

    if p["track_view"] and not p["token"]:
        bad("the track-view cases (smoke plugin reader-track-view) need the app's API token; set slipway_api_token "
            "(vault), or leave the plugin out of the app's slipway.yml")
    if p["track_view"] and not UUID_RE.match(p["book_id"] or ""):
        bad("smoke book id %r is not a UUID; set slipway_smoke_book_id to an existing book's id" % p["book_id"])
    for check in p["extra_checks"]:
        if check["auth"] and not p["token"]:
            bad("smoke check %r sends the API token (auth) but none is set; set slipway_api_token (vault), "
                "or auth: false on the check" % check["name"])
    if len(set(p["view_types"])) < 2:
        bad("view_types needs two distinct view types, got %s; set smoke_test_view_types, e.g. [card_view, reader_open]"
            % p["view_types"])
    if p["concurrency"] < 1:
        bad("concurrency must be at least 1, got %d; set smoke_test_concurrency" % p["concurrency"])
    if p["track_view"] and p["reset"] and not p["login_db"]:
        bad("reset=true needs the database login (login_db, login_host, login_user, login_password: slipway_db_*); "
            "set them, or set smoke_test_reset: false")
    if not re.match(r"^https?://", p["url"]):
        bad("url %r is not an http(s) URL; set slipway_app_url, e.g. http://127.0.0.1:3000" % p["url"])
    for check in p["extra_checks"]:
        if not check["path"].startswith("/"):
            bad("extra check %r: path %r must start with /" % (check["name"], check["path"]))

    smoke = Smoke(module)

    def summary():
        return "%d/%d passed" % (sum(1 for c in smoke.cases if c["ok"] is True), len(smoke.planned()))

    try:
        smoke.run()
    except Unreachable as exc:
        module.fail_json(msg=smoke.clean("cannot reach the app: %s; is it running (pm2 status) at %s?" % (exc, p["url"])),
                         changed=False, ok=False, cases=smoke.cases, summary=summary())
    except Abort as exc:
        module.fail_json(msg=smoke.clean(str(exc)), changed=False, ok=False, cases=smoke.cases, summary=summary())

    ok = all(c["ok"] is True for c in smoke.cases)
    result = dict(changed=False, ok=ok, summary=summary(), cases=smoke.cases)
    try:
        final = smoke.stats()[0] if p["track_view"] else None
    except Unreachable:
        final = None
    if final is not None:
        result["stats"] = final
    if not ok:
        first = next(c for c in smoke.cases if c["ok"] is False)
        module.fail_json(msg=smoke.clean("smoke case %r failed: expected %s, got %s (%s)"
                                         % (first["name"], first["expected"], first["got"], result["summary"])), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
