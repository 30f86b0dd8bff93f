"""module_utils/drift.py's comparison on hand-built catalogs (the shapes catalog.read returns): the
cases a review found, each as the on-call engineer would meet it. The whole path against real
databases is tests/integration/test_drift_engine.py."""
from __future__ import annotations

from ansible_collections.slipway.core.plugins.module_utils import drift

T = "public.t"


def index(name, definition="CREATE UNIQUE INDEX ON public.t USING btree (a)", unique=True, valid=True, cols=("a",)):
    key = f"index:{definition}"
    return {"key": key, "kind": "index", "name": name, "table": T,
            "def": {"definition": definition, "unique": unique, "valid": valid, "columns": list(cols),
                    "partial_or_expression": False}}


def catalog(*objects):
    out = {"table:public.t": {"key": "table:public.t", "kind": "table", "name": T, "table": None, "def": {"partitioned": False}}}
    for obj in objects:
        key = obj["key"]
        if key in out:  # as catalog.read keeps a second object of one definition
            obj = dict(obj, key=f"{key}#{obj['name']}", duplicate_of=out[key]["name"])
        out[obj["key"]] = obj
    return out


def kinds(found):
    return sorted((f["kind"], f["object"]["name"], f["severity"]) for f in found)


def test_a_reindex_leftover_beside_its_valid_twin_is_a_warning_not_a_critical_rename():
    found = drift.compare(catalog(index("x_idx")), catalog(index("x_idx"), index("x_idx_ccnew", valid=False)))
    assert kinds(found) == [("extra", "x_idx_ccnew", "info"), ("invalid", "x_idx_ccnew", "warning")]
    assert "x_idx" in next(f for f in found if f["kind"] == "invalid")["why"]


def test_a_unique_index_changed_under_its_name_is_critical():
    changed = index("x_idx", definition="CREATE UNIQUE INDEX ON public.t USING btree (a) WHERE (a > 0)")
    found = drift.compare(catalog(index("x_idx")), catalog(changed))
    assert kinds(found) == [("changed", "x_idx", "critical")]


def test_enums_missing_or_reordered_are_reported():
    enum = {"key": "enum:public.state", "kind": "enum", "name": "public.state", "table": None, "def": {"labels": ["a", "b"]}}
    assert kinds(drift.compare({enum["key"]: enum}, {})) == [("missing", "public.state", "critical")]
    swapped = {**enum, "def": {"labels": ["b", "a"]}}
    assert kinds(drift.compare({enum["key"]: enum}, {enum["key"]: swapped})) == [("changed", "public.state", "warning")]


def test_unknown_tracking_rows_are_findings():
    classified = {"migrations": [], "unknown_rows": [{"id": 9, "hash": "h", "created_at": 1}]}
    found = drift.migration_findings(classified)
    assert [(f["object"]["kind"], f["severity"]) for f in found] == [("tracking row", "warning")]
    assert "rolled back" in found[0]["why"]


def test_the_fingerprint_names_the_severity():
    a = drift.compare(catalog(index("x_idx")), catalog())[0]
    b = dict(a, severity="warning")
    assert a["fingerprint"] != drift._fingerprint(b)
