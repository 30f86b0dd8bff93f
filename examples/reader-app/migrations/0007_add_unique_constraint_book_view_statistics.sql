-- Consolidate duplicate (book_id, view_type) rows before adding the UNIQUE constraint
-- that the track-view upsert (ON CONFLICT (book_id, view_type)) depends on: keep the
-- lowest id per group with view_count = SUM and last_viewed_at = MAX, delete the rest.
UPDATE "book_view_statistics" AS "keep"
SET "view_count" = "agg"."total_count",
	"last_viewed_at" = "agg"."max_last_viewed_at"
FROM (
	SELECT MIN("id") AS "keep_id", SUM("view_count")::integer AS "total_count", MAX("last_viewed_at") AS "max_last_viewed_at"
	FROM "book_view_statistics"
	GROUP BY "book_id", "view_type"
	HAVING COUNT(*) > 1
) AS "agg"
WHERE "keep"."id" = "agg"."keep_id";--> statement-breakpoint
DELETE FROM "book_view_statistics" AS "dup"
USING "book_view_statistics" AS "keep"
WHERE "dup"."book_id" = "keep"."book_id"
	AND "dup"."view_type" = "keep"."view_type"
	AND "dup"."id" > "keep"."id";--> statement-breakpoint
ALTER TABLE "book_view_statistics" ADD CONSTRAINT "book_view_statistics_book_id_view_type_unique" UNIQUE("book_id","view_type");