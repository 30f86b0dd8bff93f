# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""A database's schema as PostgreSQL's catalogs say it, for the drift check (module_utils/drift.py):
one dict per object, keyed so that the same object in two databases (the live one and a shadow
built from the migrations) has the same key.

Objects are read with ``search_path`` set to ``pg_catalog`` alone, so every name in a definition
PostgreSQL prints (``pg_get_constraintdef``, ``pg_get_indexdef``, column defaults, views, functions,
triggers) is schema-qualified the same way in both databases. Constraints and indexes are keyed by
their *definition* (table, kind, ``pg_get_*def`` with the name left out), so a difference of name
only is a rename; tables, columns, enums, sequences, views, functions and triggers by name. Left
out: PostgreSQL's own schemas, the drizzle tracking schema (and any named in ``exclude``), objects
that belong to an extension, column order, owners, grants, comments and sequence values.

Every object: ``{"key", "kind", "name", "table" (or None), "def": {...}}``; ``read`` returns
``{key: object}``. Two objects of one definition (a duplicate index, an INVALID ``_ccnew`` left by
an interrupted ``REINDEX CONCURRENTLY``): the valid one (else the first by name) holds the key, the
other ``<key>#<name>`` with ``duplicate_of``. Constraints and triggers that partitions inherit are
their parent's. Nothing here writes.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")
DEFAULT_EXCLUDE = ("drizzle",)

# the schemas to read: not PostgreSQL's own, not excluded; %(exclude)s is a text[]
_SCHEMAS = """
SELECT n.oid FROM pg_namespace n
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg_temp_%%' AND n.nspname NOT LIKE 'pg_toast_temp_%%'
  AND NOT n.nspname = ANY(%(exclude)s)
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass AND d.objid = n.oid
                  AND d.deptype = 'e')
"""

# objects an extension owns are the extension's, not the app's
_NOT_EXTENSION = """NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = %s::regclass AND d.objid = {oid}
                        AND d.deptype = 'e')"""

_QUERIES = {
    "extension": """
SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname <> 'plpgsql' ORDER BY 1""",
    "enum": """
SELECT n.nspname || '.' || t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
WHERE n.oid IN (SCHEMAS) AND """ + _NOT_EXTENSION.format(oid="t.oid") % "'pg_type'" + """
GROUP BY 1 ORDER BY 1""",
    "table": """
SELECT n.nspname || '.' || c.relname, c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.oid IN (SCHEMAS) AND NOT c.relispartition
  AND """ + _NOT_EXTENSION.format(oid="c.oid") % "'pg_class'" + """ ORDER BY 1""",
    "column": """
SELECT n.nspname || '.' || c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.attgenerated = '' THEN pg_get_expr(ad.adbin, ad.adrelid) END,
       a.attidentity::text, CASE WHEN a.attgenerated <> '' THEN pg_get_expr(ad.adbin, ad.adrelid) END
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
WHERE c.relkind IN ('r', 'p') AND n.oid IN (SCHEMAS) AND NOT c.relispartition AND a.attnum > 0 AND NOT a.attisdropped
  AND """ + _NOT_EXTENSION.format(oid="c.oid") % "'pg_class'" + """ ORDER BY 1, 2""",
    "constraint": """
SELECT n.nspname || '.' || c.relname, con.conname, con.contype::text, pg_get_constraintdef(con.oid),
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(num, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num ORDER BY k.ord),
       COALESCE(ix.indisvalid, true)
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index ix ON ix.indexrelid = con.conindid AND con.contype IN ('p', 'u', 'x')
WHERE n.oid IN (SCHEMAS) AND con.contype IN ('p', 'u', 'f', 'c', 'x') AND NOT c.relispartition
  AND con.conparentid = 0
ORDER BY 1, 2""",
    "index": """
SELECT n.nspname || '.' || t.relname, i.relname,
       replace(pg_get_indexdef(x.indexrelid), ' INDEX ' || quote_ident(i.relname) || ' ON ', ' INDEX ON '),
       x.indisunique, x.indisvalid,
       ARRAY(SELECT a.attname::text FROM unnest(x.indkey::int2[]) WITH ORDINALITY k(num, ord)
             JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.num ORDER BY k.ord),
       x.indpred IS NOT NULL OR x.indexprs IS NOT NULL
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.oid IN (SCHEMAS) AND t.relkind IN ('r', 'p', 'm') AND NOT t.relispartition
  AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = x.indexrelid AND con.contype IN ('p', 'u', 'x'))
ORDER BY 1, 2""",
    "sequence": """
SELECT n.nspname || '.' || c.relname, format_type(s.seqtypid, NULL), s.seqincrement,
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
               AND d.deptype = 'i')
FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.oid IN (SCHEMAS) AND """ + _NOT_EXTENSION.format(oid="c.oid") % "'pg_class'" + """ ORDER BY 1""",
    "view": """
SELECT n.nspname || '.' || c.relname, c.relkind::text, pg_get_viewdef(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.oid IN (SCHEMAS)
  AND """ + _NOT_EXTENSION.format(oid="c.oid") % "'pg_class'" + """ ORDER BY 1""",
    "function": """
SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       pg_get_functiondef(p.oid)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.oid IN (SCHEMAS) AND p.prokind IN ('f', 'p')
  AND """ + _NOT_EXTENSION.format(oid="p.oid") % "'pg_proc'" + """ ORDER BY 1""",
    "trigger": """
SELECT n.nspname || '.' || c.relname, t.tgname,
       replace(pg_get_triggerdef(t.oid), 'TRIGGER ' || quote_ident(t.tgname) || ' ', 'TRIGGER '), t.tgenabled::text
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND n.oid IN (SCHEMAS) ORDER BY 1, 2""",
}

# read only on request (``include``): who may do what on each table, view, sequence and function
# (the owner's own rights left out: the owner differs between a shadow and the live database), and
# the comments on tables, columns, indexes, views, types and functions
_OPTIONAL = {
    "grants": """
SELECT n.nspname || '.' || c.relname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
       a.privilege_type, a.is_grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S') AND n.oid IN (SCHEMAS) AND a.grantee <> c.relowner
UNION ALL
SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) a
WHERE n.oid IN (SCHEMAS) AND a.grantee <> p.proowner
ORDER BY 1, 2, 3""",
    "comments": """
SELECT CASE WHEN d.classoid = 'pg_class'::regclass AND d.objsubid > 0 THEN 'column'
            WHEN d.classoid = 'pg_class'::regclass THEN 'relation'
            WHEN d.classoid = 'pg_proc'::regclass THEN 'function' ELSE 'type' END,
       CASE WHEN d.classoid = 'pg_class'::regclass AND d.objsubid > 0
                 THEN n.nspname || '.' || c.relname || '.' || (SELECT attname FROM pg_attribute
                      WHERE attrelid = c.oid AND attnum = d.objsubid)
            WHEN d.classoid = 'pg_class'::regclass THEN n.nspname || '.' || c.relname
            WHEN d.classoid = 'pg_proc'::regclass THEN pn.nspname || '.' || p.proname || '('
                 || pg_get_function_identity_arguments(p.oid) || ')'
            ELSE tn.nspname || '.' || t.typname END,
       d.description
FROM pg_description d
LEFT JOIN pg_class c ON d.classoid = 'pg_class'::regclass AND c.oid = d.objoid
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_proc p ON d.classoid = 'pg_proc'::regclass AND p.oid = d.objoid
LEFT JOIN pg_namespace pn ON pn.oid = p.pronamespace
LEFT JOIN pg_type t ON d.classoid = 'pg_type'::regclass AND t.oid = d.objoid
LEFT JOIN pg_namespace tn ON tn.oid = t.typnamespace
WHERE (c.oid IS NOT NULL AND n.oid IN (SCHEMAS)) OR (p.oid IS NOT NULL AND pn.oid IN (SCHEMAS))
   OR (t.oid IS NOT NULL AND tn.oid IN (SCHEMAS))
ORDER BY 1, 2""",
}
OPTIONAL = tuple(_OPTIONAL)

CONTYPES = {"p": "primary key", "u": "unique", "f": "foreign key", "c": "check", "x": "exclusion"}


def _obj(kind, name, table=None, key=None, **definition):
    return {"key": key or "%s:%s" % (kind, name), "kind": kind, "name": name, "table": table, "def": definition}


def read(conn, exclude=DEFAULT_EXCLUDE, include=()):
    """``{key: object}`` of the database ``conn`` is connected to (a psycopg connection; read-only
    queries; the session settings it pins are reset afterwards on an autocommit connection).
    ``include``: any of OPTIONAL (grants, comments), read too."""
    exclude = list(exclude or ())
    unknown = [name for name in include or () if name not in _OPTIONAL]
    if unknown:
        raise ValueError("cannot compare %s; choose from %s" % (", ".join(unknown), ", ".join(OPTIONAL)))
    objects = {}

    def add(obj):
        key = obj["key"]
        if key in objects:  # another object of the same definition (a duplicate index, a REINDEX leftover)
            have = objects[key]
            if not have["def"].get("valid", True) and obj["def"].get("valid", True):
                have, obj = obj, have  # the valid one keeps the key
                objects[key] = have
            obj = dict(obj, key="%s#%s" % (key, obj["name"]), duplicate_of=have["name"])
            key = obj["key"]
        objects[key] = obj

    with conn.cursor() as cur:
        # definitions print constants in the session's TimeZone and DateStyle: pinned, like search_path
        for name, value in (("search_path", "pg_catalog"), ("TimeZone", "UTC"), ("DateStyle", "ISO, MDY"),
                            ("IntervalStyle", "postgres"), ("extra_float_digits", "1")):
            cur.execute("SELECT set_config(%s, %s, %s)", (name, value, not conn.autocommit))

        def rows(kind):
            cur.execute((_QUERIES.get(kind) or _OPTIONAL[kind]).replace("SCHEMAS", _SCHEMAS), {"exclude": exclude})
            return cur.fetchall()

        for name, schema in rows("extension"):
            add(_obj("extension", name, schema=schema))
        for name, labels in rows("enum"):
            add(_obj("enum", name, labels=list(labels)))
        for name, relkind in rows("table"):
            add(_obj("table", name, partitioned=relkind == "p"))
        for table, col, typ, notnull, default, identity, generated in rows("column"):
            add(_obj("column", "%s.%s" % (table, col), table=table, type=typ, not_null=bool(notnull), default=default,
                     identity={"a": "always", "d": "by default"}.get(identity), generated=generated))
        for table, name, contype, condef, cols, valid in rows("constraint"):
            add(_obj("constraint", name, table=table, key="constraint:%s:%s" % (table, condef),
                     type=CONTYPES[contype], definition=condef, columns=list(cols), valid=bool(valid)))
        for table, name, indexdef, unique, valid, cols, partial in rows("index"):
            add(_obj("index", name, table=table, key="index:%s" % indexdef, definition=indexdef, unique=bool(unique),
                     valid=bool(valid), columns=list(cols), partial_or_expression=bool(partial)))
        for name, typ, increment, identity in rows("sequence"):
            if not identity:  # an identity column's sequence is the column's (compared there)
                add(_obj("sequence", name, type=typ, increment=int(increment)))
        for name, relkind, viewdef in rows("view"):
            add(_obj("view", name, materialized=relkind == "m", definition=viewdef))
        for name, fundef in rows("function"):
            add(_obj("function", name, definition=fundef))
        for table, name, trigdef, enabled in rows("trigger"):
            add(_obj("trigger", name, table=table, key="trigger:%s:%s" % (table, trigdef), definition=trigdef,
                     enabled=enabled != "D"))
        if "grants" in (include or ()):
            for target, grantee, privilege, grantable in rows("grants"):
                add(_obj("grant", "%s %s to %s" % (privilege, target, grantee), table=None, on=target, grantee=grantee,
                         privilege=privilege, grantable=bool(grantable)))
        if "comments" in (include or ()):
            for kind, target, text in rows("comments"):
                add(_obj("comment", "on %s %s" % (kind, target), text=text))
        if conn.autocommit:
            for name in ("search_path", "TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits"):
                cur.execute("RESET %s" % name)
    return objects
