'use strict';

// Drizzle schema for the reader app. Migrations in ../migrations are generated
// from this file with `npx drizzle-kit generate --name <tag>`.
const {
  pgTable,
  uuid,
  varchar,
  text,
  timestamp,
  serial,
  integer,
  primaryKey,
  index,
  unique,
} = require('drizzle-orm/pg-core');

const users = pgTable('users', {
  id: uuid('id').primaryKey().defaultRandom(),
  email: varchar('email', { length: 255 }).notNull().unique(),
  displayName: varchar('display_name', { length: 255 }),
  createdAt: timestamp('created_at').notNull().defaultNow(),
});

const books = pgTable(
  'books',
  {
    id: uuid('id').primaryKey().defaultRandom(),
    title: varchar('title', { length: 500 }).notNull(),
    author: varchar('author', { length: 255 }),
    description: text('description'),
    coverUrl: varchar('cover_url', { length: 1000 }),
    language: varchar('language', { length: 16 }),
    createdAt: timestamp('created_at').notNull().defaultNow(),
  },
  (t) => [index('books_title_idx').on(t.title)],
);

const bookViewStatistics = pgTable(
  'book_view_statistics',
  {
    id: serial('id').primaryKey(),
    bookId: uuid('book_id')
      .notNull()
      .references(() => books.id, { onDelete: 'cascade' }),
    viewType: varchar('view_type', { length: 32 }).notNull(),
    viewCount: integer('view_count').notNull().default(0),
    lastViewedAt: timestamp('last_viewed_at'),
    createdAt: timestamp('created_at').notNull().defaultNow(),
  },
  (t) => [
    index('book_view_statistics_book_id_idx').on(t.bookId),
    unique('book_view_statistics_book_id_view_type_unique').on(t.bookId, t.viewType),
  ],
);

const readingProgress = pgTable(
  'reading_progress',
  {
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    bookId: uuid('book_id')
      .notNull()
      .references(() => books.id, { onDelete: 'cascade' }),
    position: integer('position').notNull().default(0),
    updatedAt: timestamp('updated_at').notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.userId, t.bookId] })],
);

const bookmarks = pgTable('bookmarks', {
  id: serial('id').primaryKey(),
  userId: uuid('user_id')
    .notNull()
    .references(() => users.id, { onDelete: 'cascade' }),
  bookId: uuid('book_id')
    .notNull()
    .references(() => books.id, { onDelete: 'cascade' }),
  position: integer('position').notNull(),
  note: text('note'),
  createdAt: timestamp('created_at').notNull().defaultNow(),
});

module.exports = { users, books, bookViewStatistics, readingProgress, bookmarks };
