ALTER TABLE "books" ADD COLUMN "description" text;--> statement-breakpoint
ALTER TABLE "books" ADD COLUMN "cover_url" varchar(1000);--> statement-breakpoint
ALTER TABLE "books" ADD COLUMN "language" varchar(16);