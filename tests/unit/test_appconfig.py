"""An app's settings (slipway/appconfig.py): slipway.yml and the defaults read from the app itself
(the ecosystem file through node, drizzle.config's `out`), and one `cause; fix` line for bad ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT

from slipway import appconfig
from slipway.errors import SlipwayError

JOURNAL = {"version": "7", "dialect": "postgresql", "entries": []}


def app(tmp_path: Path, files: dict) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if isinstance(text, str) else json.dumps(text))
    return tmp_path


ONE_APP = "module.exports = { apps: [{ name: 'web', script: 'server.js' }] };\n"


def test_the_reference_app():
    cfg = appconfig.load(ROOT / "examples" / "reader-app")
    assert (cfg.app, cfg.app_from, cfg.ecosystem) == ("ollama-reader", "ecosystem", "ecosystem.config.js")
    assert (cfg.migrations, cfg.migrations_from) == ("migrations", "drizzle.config.js")
    assert cfg.plugins == ["reader-track-view"] and cfg.needs_token
    assert cfg.as_vars()["health"] == {"path": "/api/health", "status": 200}


def test_the_notes_app():
    cfg = appconfig.load(ROOT / "examples" / "notes-app")
    assert (cfg.app, cfg.ecosystem, cfg.migrations) == ("notes-api", "ecosystem.config.cjs", "drizzle")
    assert cfg.migrations_from == "drizzle.config.ts" and cfg.build.startswith("npm ci")
    assert (cfg.health_path, cfg.health_status) == ("/healthz", 200)
    assert cfg.plugins == [] and not cfg.needs_token
    assert cfg.checks == [{"name": "notes list", "method": "GET", "path": "/api/notes", "status": 200,
                           "json": None, "body": None, "auth": False}]


def test_an_app_without_slipway_yml_gets_the_defaults(tmp_path):
    cfg = appconfig.load(app(tmp_path, {"ecosystem.config.js": ONE_APP, "drizzle/meta/_journal.json": JOURNAL}))
    assert (cfg.app, cfg.ecosystem, cfg.migrations, cfg.migrations_from) == ("web", "ecosystem.config.js", "drizzle", "default")
    assert (cfg.build, cfg.health_path, cfg.health_status, cfg.smoke, cfg.from_file) == (None, "/api/health", 200, [], False)


def test_migrations_fall_back_to_migrations_and_follow_drizzle_config(tmp_path):
    cfg = appconfig.load(app(tmp_path / "a", {"ecosystem.config.cjs": ONE_APP, "migrations/meta/_journal.json": JOURNAL}))
    assert (cfg.migrations, cfg.ecosystem) == ("migrations", "ecosystem.config.cjs")
    cfg = appconfig.load(app(tmp_path / "b", {"ecosystem.config.js": ONE_APP, "db/out/meta/_journal.json": JOURNAL,
                                              "drizzle.config.ts": 'export default { out: "./db/out", dialect: "postgresql" };'}))
    assert (cfg.migrations, cfg.migrations_from) == ("db/out", "drizzle.config.ts")


def test_several_apps_leave_the_name_to_the_inventory_or_slipway_yml(tmp_path):
    two = "module.exports = { apps: [{ name: 'web' }, { name: 'worker' }] };\n"
    cfg = appconfig.load(app(tmp_path / "a", {"ecosystem.config.js": two, "drizzle/meta/_journal.json": JOURNAL}))
    assert (cfg.app, cfg.app_from) == (None, "inventory")
    cfg = appconfig.load(app(tmp_path / "b", {"ecosystem.config.js": two, "drizzle/meta/_journal.json": JOURNAL,
                                              "slipway.yml": "app: worker\n"}))
    assert (cfg.app, cfg.app_from) == ("worker", "slipway.yml")


@pytest.mark.parametrize("files, expected", [
    ({"slipway.yml": "color: blue\n"}, "unknown key 'color'; use only app, ecosystem"),
    ({"slipway.yml": "- a\n"}, "is not a mapping"),
    ({"slipway.yml": "app: [x\n"}, "not readable YAML"),
    ({"slipway.yml": "app: api\n"}, "names app 'api' but ecosystem.config.js defines ['web']"),
    ({"slipway.yml": "migrations: ../elsewhere\n"}, "is outside the app"),
    ({"slipway.yml": "migrations: db\n"}, "db/meta/_journal.json is missing, folder db named in slipway.yml"),
    ({"slipway.yml": "ecosystem: pm2.json\n"}, "the ecosystem file pm2.json named in slipway.yml is missing"),
    ({"slipway.yml": "health: {path: healthz}\n"}, "does not start with /"),
    ({"slipway.yml": "health: {status: 999}\n"}, "is not an HTTP status"),
    ({"slipway.yml": "smoke: [{plugin: nope}]\n"}, "unknown plugin 'nope'; slipway has reader-track-view"),
    ({"slipway.yml": "smoke: [{name: a, path: /a}, {name: a, path: /b}]\n"}, "is used twice"),
    ({"slipway.yml": "smoke: [{name: a, path: /a, status: '200'}]\n"}, "status must be a int"),
    ({"slipway.yml": "smoke: [{name: a, path: /a, method: BREW}]\n"}, "method 'BREW' is not one of"),
])
def test_bad_settings_are_one_line_naming_the_fix(tmp_path, files, expected):
    src = app(tmp_path, {"ecosystem.config.js": ONE_APP, "drizzle/meta/_journal.json": JOURNAL, **files})
    with pytest.raises(SlipwayError) as err:
        appconfig.load(src, "release x")
    message = str(err.value)
    assert expected in message and "\n" not in message and "; " in message, message


def test_no_ecosystem_and_no_migrations_are_refused(tmp_path):
    with pytest.raises(SlipwayError, match="no PM2 ecosystem file .*; add one, or name yours with 'ecosystem'"):
        appconfig.load(app(tmp_path / "a", {"drizzle/meta/_journal.json": JOURNAL}))
    with pytest.raises(SlipwayError, match="no drizzle migrations: drizzle/meta/_journal.json is missing"):
        appconfig.load(app(tmp_path / "b", {"ecosystem.config.js": ONE_APP}))
    with pytest.raises(SlipwayError, match="node could not load ecosystem.config.js"):
        appconfig.load(app(tmp_path / "c", {"ecosystem.config.js": "module.exports = {", "drizzle/meta/_journal.json": JOURNAL}))


def test_the_node_version_the_app_asks_for(tmp_path):
    base = {"ecosystem.config.js": ONE_APP, "drizzle/meta/_journal.json": JOURNAL}
    cfg = appconfig.load(app(tmp_path / "a", {**base, "package.json": {"engines": {"node": ">=20"}}, ".nvmrc": "18\n"}))
    assert (cfg.node, cfg.node_from) == (">=20", "package.json engines.node")
    cfg = appconfig.load(app(tmp_path / "b", {**base, "package.json": {}, ".nvmrc": "v20.11.1\n"}))
    assert (cfg.node, cfg.node_from) == ("20.11.1", ".nvmrc")
    cfg = appconfig.load(app(tmp_path / "c", {**base, "package.json": {}, ".nvmrc": "lts/iron\n"}))
    assert cfg.node is None  # an alias names no version here
    with pytest.raises(SlipwayError, match="engines.node 'soon' is not a version range; write one npm understands"):
        appconfig.load(app(tmp_path / "d", {**base, "package.json": {"engines": {"node": "soon"}}}))


def test_node_satisfies_uses_npm_range_rules():
    from ansible_collections.slipway.core.plugins.test.node_version import node_satisfies

    assert node_satisfies("v20.20.2", ">=20") and node_satisfies("v20.20.2", "^18.17 || >=20")
    assert node_satisfies("v20.20.2", "20.x") and node_satisfies("v20.20.2", "20")
    assert not node_satisfies("v20.20.2", "^18.0.0") and not node_satisfies("v20.20.2", ">=22")
    assert not node_satisfies("not a version", ">=20")
