"""The incident's table grown big, for the online-migration tests and benchmarks (no fixtures here:
bench/ imports it too)."""
from __future__ import annotations


def grow_statistics(conn, rows: int, dups: float = 0.0) -> None:
    """``rows`` unique (book, view_type) rows (books ``md5(i)::uuid``, two view types each) and
    ``dups`` x ``rows`` rows repeating random existing keys; then ANALYZE, so the planner's estimate
    (which decides the online path) is current."""
    conn.execute("INSERT INTO books (id, title, author) SELECT md5(i::text)::uuid, 'b' || i, 'a' "
                 "FROM generate_series(0, %s) i", (rows // 2 + 1,))
    key = "md5((k / 2)::text)::uuid, CASE WHEN k %% 2 = 0 THEN 'card_view' ELSE 'reader_open' END, 1"
    conn.execute(f"INSERT INTO book_view_statistics (book_id, view_type, view_count) SELECT {key} "
                 "FROM generate_series(1, %s) k", (rows,))
    if dups:
        conn.execute(f"INSERT INTO book_view_statistics (book_id, view_type, view_count) SELECT {key} "
                     "FROM (SELECT (random() * (%s - 1))::bigint + 1 AS k FROM generate_series(1, %s)) s",
                     (rows, int(rows * dups)))
    conn.execute("ANALYZE book_view_statistics")
