"""slipway's command line (Invoke). `invoke --list` shows the tasks; `invoke --help TASK` their flags.

The composition root: one collection per topic from slipway/cli/ (see its package docstring), and
the local sandbox's inventory added to slipway's inventory sources (production code never imports
the sandbox)."""
from invoke import Collection

from slipway.cli import db, deploy, dev, hosts, observe, schema
from slipway.cli import sandbox as sandbox_tasks
from slipway.sandbox import register

register()  # `invoke deploy --host sandbox` finds the sandbox's hosts while one is up

ns = Collection()
ns.add_collection(sandbox_tasks.ns)
ns.add_collection(schema.ns)
for topic in (hosts, deploy, db, observe, dev):
    for each in topic.TASKS:
        ns.add_task(each)
ns.add_task(sandbox_tasks.demo)
ns.configure({"run": {"echo": False, "warn": False}})
