//! The schema: names, the migration script, and the statements the store runs.
//!
//! Two tables in the configured schema: `<table>` (the tasks) and `<table>_meta` (one row: the
//! schema version, and the last run number handed out, which makes task ids unique among the
//! pools sharing the table). The migration script is one transaction under an advisory lock
//! taken on the table's name, so replicas starting together apply it once; every statement in
//! it is idempotent (`IF NOT EXISTS`, a version guard), so it may run again, by the library at
//! each start or by a DBA from `drainpool schema`. A database whose version is newer than this
//! build's stops the start and is not touched.
//!
//! Rules for the next migration: append it to the script, guarded by `IF NOT EXISTS` or the
//! version, and raise [`VERSION`]; never edit an applied one.
//!
//! The tasks table, version 3 (version 2 without the options, from `priority` on; version 1
//! without `dead_at` too):
//!
//! | column | type | what |
//! | --- | --- | --- |
//! | `run`, `seq` | `bigint`, primary key | the task id (`TaskId::run`, `TaskId::seq`) |
//! | `attempts` | `bigint` | failed runs so far |
//! | `interruptions` | `bigint` | consecutive runs interrupted (at a drain deadline, or by a pool that died) |
//! | `interrupted` | `boolean` | whether the last run was interrupted |
//! | `enqueued_at` | `timestamptz` | when the task was first accepted |
//! | `run_after` | `timestamptz` | not to run before (a retry's backoff); the epoch: at once |
//! | `last_error` | `text`, null | the last run's error |
//! | `payload` | `bytea` | the payload, as the pool's codec encoded it |
//! | `lease_owner` | `bigint`, null | the run number of the pool that claimed it |
//! | `lease_expires` | `timestamptz`, null | until when that claim holds without renewal |
//! | `dead_at` | `timestamptz`, null | set: a dead letter, since then (its `run_after` is `infinity`, so no pool claims it, a version-1 pool during a rolling upgrade included) |
//! | `priority` | `smallint`, default 0 | 0 to 7: claims take higher levels first |
//! | `max_attempts` | `integer`, null | the task's own retry limit; null: the pool's |
//! | `expires_at` | `timestamptz`, null | no run starts after it; null: never |
//! | `unique_key` | `text`, null | the task's unique key, held by the pool that claims it |

use super::columns::Options;
use super::error::PostgresError;

/// The schema version this build reads and writes.
pub(super) const VERSION: i32 = 3;

/// The default schema.
pub(super) const DEFAULT_SCHEMA: &str = "public";
/// The default tasks table.
pub(super) const DEFAULT_TABLE: &str = "drainpool_tasks";

/// The longest table name: PostgreSQL keeps 63 bytes of a name, and the table's indexes add
/// `_lease`, `_claim`.
const MAX_TABLE: usize = 57;
const MAX_SCHEMA: usize = 63;

/// The quoted names of one store's objects, and its statements.
#[derive(Debug)]
pub(super) struct Sql {
    schema: String,
    tasks: String,
    meta: String,
    index: String,
    dead_index: String,
    claim_index: String,
    /// The notification channel, quoted.
    pub(super) channel: String,
    /// The advisory lock's key, a literal.
    lock_key: String,
}

/// Checks a schema or table name: ASCII letters, digits and `_`, not starting with a digit,
/// at most `max` bytes. Names are quoted too, but kept to these so that they never need
/// escaping anywhere (a string literal, a dollar-quoted block, a channel).
fn check_name(what: &str, name: &str, max: usize) -> Result<(), PostgresError> {
    let valid = !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(PostgresError::refused(
            "configure",
            format!(
                "{what} name {name:?} must be 1 to {max} ASCII letters, digits or underscores, \
                 not starting with a digit"
            ),
        ))
    }
}

impl Sql {
    pub(super) fn new(schema: &str, table: &str) -> Result<Self, PostgresError> {
        check_name("schema", schema, MAX_SCHEMA)?;
        check_name("table", table, MAX_TABLE)?;
        let mut channel = format!("drainpool.{schema}.{table}");
        // PostgreSQL would cut it there too; the names are ASCII.
        channel.truncate(63);
        Ok(Self {
            schema: format!("\"{schema}\""),
            tasks: format!("\"{schema}\".\"{table}\""),
            meta: format!("\"{schema}\".\"{table}_meta\""),
            index: format!("\"{table}_lease\""),
            dead_index: format!("\"{table}_dead\""),
            claim_index: format!("\"{table}_claim\""),
            channel: format!("\"{channel}\""),
            lock_key: format!("'drainpool {schema}.{table}'"),
        })
    }

    /// The migration script: one transaction, idempotent (see the module docs).
    pub(super) fn migration(&self) -> String {
        let Self {
            schema,
            tasks,
            meta,
            index,
            dead_index,
            claim_index,
            lock_key,
            ..
        } = self;
        format!(
            "\
-- drainpool schema, version {VERSION}: the tasks table {tasks} and its version table {meta}.
-- Idempotent: safe to apply again, and while pools run.
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended({lock_key}, 0));
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {meta} (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL,
    last_run bigint NOT NULL
);
INSERT INTO {meta} (version, last_run) VALUES (0, 0) ON CONFLICT DO NOTHING;
DO $$
BEGIN
    IF (SELECT version FROM {meta}) > {VERSION} THEN
        RAISE EXCEPTION 'drainpool: the schema is newer than version {VERSION}; run a newer drainpool';
    END IF;
END
$$;

-- Version 1.
CREATE TABLE IF NOT EXISTS {tasks} (
    run bigint NOT NULL,
    seq bigint NOT NULL,
    attempts bigint NOT NULL DEFAULT 0,
    interruptions bigint NOT NULL DEFAULT 0,
    interrupted boolean NOT NULL DEFAULT false,
    enqueued_at timestamptz NOT NULL,
    run_after timestamptz NOT NULL,
    last_error text,
    payload bytea NOT NULL,
    lease_owner bigint,
    lease_expires timestamptz,
    PRIMARY KEY (run, seq)
);
CREATE INDEX IF NOT EXISTS {index} ON {tasks} (lease_owner) WHERE lease_owner IS NOT NULL;
UPDATE {meta} SET version = 1 WHERE version < 1;

-- Version 2: dead letters are rows, dead_at set and run_after 'infinity' (so that no pool
-- claims one, a version-1 pool still running during a rolling upgrade included). Behind the
-- version, so that a start on a table already there takes no lock on it (ALTER TABLE's
-- would stop every pool's claims and inserts while it waits).
DO $$
BEGIN
    IF (SELECT version FROM {meta}) < 2 THEN
        ALTER TABLE {tasks} ADD COLUMN IF NOT EXISTS dead_at timestamptz;
        CREATE INDEX IF NOT EXISTS {dead_index} ON {tasks} (run, seq) WHERE dead_at IS NOT NULL;
        UPDATE {meta} SET version = 2 WHERE version < 2;
    END IF;
END
$$;

-- Version 3: task options. A column with a constant default and nullable ones: no table
-- rewrite. A version-2 pool still running ignores them (its inserts get the defaults, its
-- upserts keep them). The claim's order (priority first) has an index of its own.
DO $$
BEGIN
    IF (SELECT version FROM {meta}) < 3 THEN
        ALTER TABLE {tasks} ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS max_attempts integer,
            ADD COLUMN IF NOT EXISTS expires_at timestamptz,
            ADD COLUMN IF NOT EXISTS unique_key text;
        CREATE INDEX IF NOT EXISTS {claim_index} ON {tasks} (priority DESC, run, seq)
            WHERE dead_at IS NULL;
        UPDATE {meta} SET version = 3 WHERE version < 3;
    END IF;
END
$$;

COMMIT;
"
        )
    }

    /// The schema's version (the meta table must exist).
    pub(super) fn version(&self) -> String {
        format!("SELECT version FROM {}", self.meta)
    }

    /// This start's run number: above every one handed out before, and at least `$1`.
    pub(super) fn take_run(&self) -> String {
        format!(
            "UPDATE {} SET last_run = GREATEST(last_run + 1, $1) RETURNING last_run",
            self.meta
        )
    }

    /// Writes tasks (arrays, one row per index: `$1` to `$9` the state, `$11` to `$14` the
    /// options); a task already there is overwritten, its lease cleared, unless another pool
    /// than `$10` holds a live lease on it.
    pub(super) fn hand_off(&self) -> String {
        format!(
            "{} \
             ON CONFLICT (run, seq) DO UPDATE SET attempts = EXCLUDED.attempts, \
                 interruptions = EXCLUDED.interruptions, interrupted = EXCLUDED.interrupted, \
                 run_after = EXCLUDED.run_after, last_error = EXCLUDED.last_error, \
                 payload = EXCLUDED.payload, {SET_OPTIONS}, lease_owner = NULL, \
                 lease_expires = NULL \
             WHERE t.lease_owner IS NULL OR t.lease_owner = $10 OR t.lease_expires < now()",
            self.hand_off_rows(11),
        )
    }

    /// Writes tasks that were never in the table (the arrays of `hand_off`, without the owner:
    /// `$10` to `$13` the options). A row already there fails it (unique violation): no
    /// speculative insertion into the primary key, which made the upsert a third slower.
    pub(super) fn hand_off_new(&self) -> String {
        self.hand_off_rows(10)
    }

    /// The `INSERT … SELECT … FROM unnest(…)` of a handoff, the option arrays from
    /// `$options`.
    fn hand_off_rows(&self, options: usize) -> String {
        format!(
            "INSERT INTO {t} AS t (run, seq, attempts, interruptions, interrupted, enqueued_at, \
                 run_after, last_error, payload, {OPTIONS}) \
             SELECT r, s, a, i, x, to_timestamp(e / 1000.0), to_timestamp(n / 1000.0), l, p, \
                 o, m, to_timestamp(d / 1000.0), k \
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::bool[], \
                 $6::int8[], $7::int8[], $8::text[], $9::bytea[], {options}) \
                 AS u(r, s, a, i, x, e, n, l, p, o, m, d, k)",
            t = self.tasks,
            options = option_arrays(options),
        )
    }

    /// Wakes the pools that listen (delivered when the transaction commits).
    pub(super) fn notify(&self) -> String {
        format!("NOTIFY {}", self.channel)
    }

    pub(super) fn listen(&self) -> String {
        format!("LISTEN {}", self.channel)
    }

    /// Claims up to `$1` tasks due now, higher priorities first and in id order within one,
    /// for owner `$2` for `$3` seconds. A task whose lease had expired is rescued: its
    /// interruption is counted.
    pub(super) fn claim(&self) -> String {
        format!(
            "WITH c AS ( \
                 SELECT run, seq, lease_owner IS NOT NULL AS rescued FROM {t} \
                 WHERE run_after <= now() AND (lease_owner IS NULL OR lease_expires < now()) \
                     AND dead_at IS NULL \
                 ORDER BY priority DESC, run, seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
             UPDATE {t} AS t SET lease_owner = $2, \
                 lease_expires = now() + make_interval(secs => $3), \
                 interruptions = t.interruptions + c.rescued::int, \
                 interrupted = t.interrupted OR c.rescued \
             FROM c WHERE t.run = c.run AND t.seq = c.seq \
             RETURNING t.run, t.seq, t.attempts, t.interruptions, t.interrupted, \
                 (extract(epoch FROM t.enqueued_at) * 1000)::int8, \
                 (extract(epoch FROM t.run_after) * 1000)::int8, \
                 t.last_error, t.payload, c.rescued, t.priority, t.max_attempts, \
                 {expires}, t.unique_key",
            t = self.tasks,
            expires = ms("t.expires_at"),
        )
    }

    /// Write-ahead: inserts new tasks (arrays: run, seq, enqueued ms, not-before ms, payload;
    /// `$8` to `$11` the options), leased to owner `$6` for `$7` seconds.
    pub(super) fn write_ahead(&self) -> String {
        format!(
            "INSERT INTO {t} (run, seq, enqueued_at, run_after, payload, lease_owner, \
                 lease_expires, {OPTIONS}) \
             SELECT r, s, to_timestamp(e / 1000.0), to_timestamp(n / 1000.0), p, $6, \
                 now() + make_interval(secs => $7), o, m, to_timestamp(d / 1000.0), k \
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[], \
                 {options}) AS u(r, s, e, n, p, o, m, d, k)",
            t = self.tasks,
            options = option_arrays(8),
        )
    }

    /// One task, unleased, as literals (the payload and the key as hex, which no server
    /// setting reads differently), then the notification: both take effect at the commit of
    /// the transaction they run in.
    pub(super) fn insert_literal(&self, task: &Literal<'_>) -> String {
        let Literal {
            run,
            seq,
            enqueued_ms,
            not_before_ms,
            payload,
            options,
        } = task;
        let null = || "NULL".to_string();
        let max_attempts = options.max_attempts.map_or_else(null, |n| n.to_string());
        let expires = options
            .expires_ms
            .map_or_else(null, |ms| format!("to_timestamp({ms} / 1000.0)"));
        let key = options.key.as_deref().map_or_else(null, |key| {
            format!(
                "convert_from(decode('{}', 'hex'), 'UTF8')",
                hex(key.as_bytes())
            )
        });
        format!(
            "INSERT INTO {t} (run, seq, enqueued_at, run_after, payload, {OPTIONS}) \
             VALUES ({run}, {seq}, to_timestamp({enqueued_ms} / 1000.0), \
             to_timestamp({not_before_ms} / 1000.0), decode('{payload}', 'hex'), {priority}, \
             {max_attempts}, {expires}, {key}); {notify};",
            t = self.tasks,
            payload = hex(payload),
            priority = options.priority,
            notify = self.notify(),
        )
    }

    /// Writes one task as a dead letter (`$7`: the reason; `$10` to `$13` its options), its
    /// lease cleared, unless another pool than `$9` holds a live lease on it; returns a row if
    /// written.
    pub(super) fn dead_letter(&self) -> String {
        format!(
            "INSERT INTO {t} AS t (run, seq, attempts, interruptions, interrupted, enqueued_at, \
                 run_after, last_error, payload, dead_at, {OPTIONS}) \
             VALUES ($1::int8, $2::int8, $3::int8, $4::int8, $5::bool, \
                 to_timestamp($6::int8 / 1000.0), 'infinity', $7::text, $8::bytea, now(), \
                 $10::int2, $11::int4, to_timestamp($12::int8 / 1000.0), $13::text) \
             ON CONFLICT (run, seq) DO UPDATE SET attempts = EXCLUDED.attempts, \
                 interruptions = EXCLUDED.interruptions, interrupted = EXCLUDED.interrupted, \
                 run_after = 'infinity', last_error = EXCLUDED.last_error, \
                 payload = EXCLUDED.payload, {SET_OPTIONS}, dead_at = now(), \
                 lease_owner = NULL, lease_expires = NULL \
             WHERE t.lease_owner IS NULL OR t.lease_owner = $9::int8 \
                 OR t.lease_expires < now() \
             RETURNING 1",
            t = self.tasks
        )
    }

    /// Every task, live and dead, in id order.
    pub(super) fn list(&self) -> String {
        format!(
            "SELECT run, seq, attempts, interruptions, interrupted, {enqueued}, \
                 CASE WHEN run_after = 'infinity' THEN 0 ELSE {run_after} END, \
                 last_error, payload, lease_owner, {dead_at}, priority, max_attempts, \
                 {expires}, unique_key \
             FROM {t} ORDER BY run, seq",
            t = self.tasks,
            enqueued = ms("enqueued_at"),
            run_after = ms("run_after"),
            dead_at = ms("dead_at"),
            expires = ms("expires_at"),
        )
    }

    /// Takes dead letters back (every one, or those of the ids `$1`, `$2`): live again, due at
    /// once, attempts and interruptions reset, the last error and the options kept but the
    /// expiry (a requeue means to run it). Returns their ids.
    pub(super) fn requeue(&self, all: bool) -> String {
        let (from, only) = if all {
            ("", "")
        } else {
            (
                "FROM unnest($1::int8[], $2::int8[]) AS u(r, s)",
                "AND t.run = u.r AND t.seq = u.s",
            )
        };
        format!(
            "UPDATE {} AS t SET dead_at = NULL, run_after = to_timestamp(0), attempts = 0, \
                 interruptions = 0, interrupted = false, lease_owner = NULL, \
                 lease_expires = NULL, expires_at = NULL \
             {from} WHERE t.dead_at IS NOT NULL {only} RETURNING t.run, t.seq",
            self.tasks
        )
    }

    /// Renews for `$2` seconds the leases of owner `$1` on the tasks `($3, $4)` (not every
    /// row of the owner: one it gave up must expire); returns the tasks it holds among them.
    pub(super) fn renew(&self) -> String {
        format!(
            "UPDATE {} AS t SET lease_expires = now() + make_interval(secs => $2) \
             FROM unnest($3::int8[], $4::int8[]) AS h(r, s) \
             WHERE t.run = h.r AND t.seq = h.s AND t.lease_owner = $1 \
             RETURNING t.run, t.seq",
            self.tasks
        )
    }

    /// Deletes finished tasks still leased to owner `$3`.
    pub(super) fn delete(&self) -> String {
        format!(
            "DELETE FROM {} AS t USING unnest($1::int8[], $2::int8[]) AS d(r, s) \
             WHERE t.run = d.r AND t.seq = d.s AND t.lease_owner = $3",
            self.tasks
        )
    }

    /// Writes failed tasks' states, for tasks still leased to owner `$8`.
    pub(super) fn failed(&self) -> String {
        format!(
            "UPDATE {} AS t SET attempts = u.a, interruptions = u.i, interrupted = u.x, \
                 run_after = to_timestamp(u.n / 1000.0), last_error = u.l \
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::bool[], \
                 $6::int8[], $7::text[]) AS u(r, s, a, i, x, n, l) \
             WHERE t.run = u.r AND t.seq = u.s AND t.lease_owner = $8",
            self.tasks
        )
    }
}

/// A `timestamptz` column as milliseconds since the Unix epoch (`int8`).
fn ms(column: &str) -> String {
    format!("(extract(epoch FROM {column}) * 1000)::int8")
}

/// The option columns (version 3), in the order every statement writes them.
const OPTIONS: &str = "priority, max_attempts, expires_at, unique_key";

/// An upsert's update of the option columns.
const SET_OPTIONS: &str = "priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts, \
    expires_at = EXCLUDED.expires_at, unique_key = EXCLUDED.unique_key";

/// The option columns' arrays for `unnest`, parameters `$first` to `$first + 3`: priority,
/// max attempts, expiry (ms), key.
fn option_arrays(first: usize) -> String {
    format!(
        "${}::int2[], ${}::int4[], ${}::int8[], ${}::text[]",
        first,
        first + 1,
        first + 2,
        first + 3
    )
}

/// Bytes as hex digits, for `decode(…, 'hex')`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// One task for [`Sql::insert_literal`], as its columns hold it.
pub(super) struct Literal<'a> {
    pub(super) run: i64,
    pub(super) seq: i64,
    pub(super) enqueued_ms: i64,
    pub(super) not_before_ms: i64,
    pub(super) payload: &'a [u8],
    pub(super) options: Options,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_sql_is_made() {
        for (schema, table) in [
            ("", "t"),
            ("s", ""),
            ("1s", "t"),
            ("s", "t;DROP"),
            ("s\"", "t"),
            ("s", "t'"),
            ("s", "t$$"),
            ("s", "é"),
            ("s", &"t".repeat(58)),
            (&"s".repeat(64), "t"),
        ] {
            let error = Sql::new(schema, table).unwrap_err();
            assert!(
                error.to_string().contains("name"),
                "{schema:?}.{table:?}: {error}"
            );
        }
        assert!(Sql::new("_s1", &"t".repeat(57)).is_ok());
    }

    #[test]
    fn the_script_names_its_objects_quoted_and_guards_every_step() {
        let sql = Sql::new("jobs", "tasks").unwrap();
        let script = sql.migration();
        assert!(script.starts_with("-- drainpool schema, version 3"));
        assert!(
            script.contains("pg_advisory_xact_lock(hashtextextended('drainpool jobs.tasks', 0))")
        );
        assert!(script.contains("CREATE TABLE IF NOT EXISTS \"jobs\".\"tasks\" ("));
        assert!(script.contains("CREATE TABLE IF NOT EXISTS \"jobs\".\"tasks_meta\" ("));
        assert!(script.contains("\"tasks_lease\" ON \"jobs\".\"tasks\""));
        assert!(script.contains("\"tasks_claim\" ON \"jobs\".\"tasks\" (priority DESC, run, seq)"));
        // Every CREATE is idempotent.
        for line in script
            .lines()
            .map(str::trim)
            .filter(|l| ["CREATE", "ALTER", "ADD"].iter().any(|s| l.starts_with(s)))
        {
            assert!(line.contains("IF NOT EXISTS"), "{line}");
        }
        // Each version's step is guarded by the version it raises.
        for version in 1..=VERSION {
            assert!(script.contains(&format!(
                "SET version = {version} WHERE version < {version};"
            )));
        }
        assert_eq!(sql.listen(), "LISTEN \"drainpool.jobs.tasks\"");
    }

    #[test]
    fn a_literal_insert_carries_the_options_and_quotes_nothing_it_is_given() {
        let sql = Sql::new("jobs", "tasks").unwrap();
        let task = |options| Literal {
            run: 3,
            seq: 9,
            enqueued_ms: 1_000,
            not_before_ms: 2_000,
            payload: b"'x",
            options,
        };
        let plain = sql.insert_literal(&task(Options::default()));
        assert!(
            plain.contains(
                "to_timestamp(2000 / 1000.0), decode('2778', 'hex'), 0, NULL, NULL, NULL);"
            ),
            "{plain}"
        );
        let all = sql.insert_literal(&task(Options {
            priority: 6,
            max_attempts: Some(4),
            expires_ms: Some(5_000),
            key: Some("o'7".into()),
        }));
        assert!(
            all.contains(
                "6, 4, to_timestamp(5000 / 1000.0), convert_from(decode('6f2737', 'hex'), 'UTF8'));"
            ),
            "{all}"
        );
        assert!(all.ends_with("NOTIFY \"drainpool.jobs.tasks\";"), "{all}");
    }

    #[test]
    fn a_long_channel_is_cut_where_postgres_cuts_it() {
        let sql = Sql::new(&"s".repeat(63), &"t".repeat(57)).unwrap();
        assert_eq!(sql.channel.len(), 63 + 2);
    }
}
