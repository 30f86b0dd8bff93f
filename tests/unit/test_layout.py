"""The host-side layout is named twice, for Python (module_utils/layout.py) and for YAML
(roles/slipway/defaults/main.yml): the two agree (no hosts, no root)."""
from __future__ import annotations

import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template
from ansible_collections.slipway.core.plugins.module_utils import layout
from conftest import ROOT

from slipway import remote

APP = "/srv/app/"  # a trailing slash, as an inventory may have it


def _yaml_layout() -> dict:
    defaults = yaml.safe_load((ROOT / "roles" / "slipway" / "defaults" / "main.yml").read_text())
    values = {**defaults, "slipway_app_dir": APP.rstrip("/")}
    values = {k: trust_as_template(v) if isinstance(v, str) else v for k, v in values.items()}
    templar = Templar(loader=DataLoader(), variables=values)  # templates from our own file: trusted
    return {k: templar.template(values[k]) for k in defaults if k != "slipway_postgres_login"}


def test_yaml_and_python_name_the_same_host_paths():
    y = _yaml_layout()
    state, lock, meta = layout.lock_paths(APP)
    assert (y["slipway_state_dir"], y["slipway_deploy_lock"], y["slipway_deploy_lock_meta"]) == (state, lock, meta)
    assert remote.lock_paths(APP) == (state, lock, meta)
    assert y["slipway_deploy_records"] == layout.deploys_file(APP)
    assert y["slipway_runtime_dir"] + "/r1" == layout.runtime_dir(APP, "r1")
    assert y["slipway_runtime_marker"] == layout.RUNTIME_COMPLETE
    assert y["slipway_incoming_dir"] == layout.join(layout.state_dir(APP), layout.INCOMING_DIR)
    assert y["slipway_releases_dir"] == layout.releases_dir(APP)
    assert y["slipway_release_marker"] == layout.BUILT_MARKER
    assert y["slipway_current_link"] == layout.current_link(APP)
    assert y["slipway_shared_links"] == layout.SHARED_LINKS


def test_the_lock_keeper_uses_the_layout_names():
    for name in (layout.CLOSING, layout.COMMIT_LOCK, layout.RUN_DIR + "/*", layout.RUNS_DIR + "/$run" + layout.JOURNAL_SUFFIX):
        assert name in remote.KEEPER, name
    assert "@" not in remote.KEEPER.replace("$@", "")
