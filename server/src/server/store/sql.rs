//! The two backends behind one small SQL interface: SQLite (rusqlite, the embedded default) and
//! PostgreSQL (the `postgres` crate, for replicas). The store's functions are written once
//! against [`Db`]; the differences are handled here:
//!
//! - Placeholders are written `?1`, `?2`… (SQLite's syntax); for PostgreSQL they are rewritten to
//!   `$1`, `$2`… ([`pg_placeholders`]).
//! - Values cross as [`Value`]: integers, text, bytes, NULL. PostgreSQL is strictly typed, so a
//!   [`Value`] is encoded as whatever type the server inferred for the parameter (an integer for an
//!   `int4` column, a boolean where the statement wants one), and read back from any integer,
//!   numeric (e.g. `SUM` of a bigint), text or bytea column.
//! - The schema is the one set of migrations, written for SQLite; [`pg_schema`] translates the few
//!   type names PostgreSQL spells differently (`INTEGER` → `BIGINT`, `BLOB` → `BYTEA`, an
//!   `INTEGER PRIMARY KEY` that SQLite fills in → an identity column).
//! - A [`Begin::Immediate`] transaction takes SQLite's write lock before its first read; on
//!   PostgreSQL it takes one transaction-scoped advisory lock, so read-then-write transactions
//!   are serialised across every replica the same way.
//!
//! Statements must stay within the SQL both accept (no `INSERT OR …`, no scalar `MAX(a, b)`,
//! every subquery in FROM named): the store's tests run on SQLite, and the server's integration
//! tests run on both.

use anyhow::{Context as _, Result, anyhow, bail};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

/// One value crossing into or out of a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(Cow<'a, str>),
    Blob(Cow<'a, [u8]>),
}

/// Something that can be bound to a placeholder.
pub trait ToValue {
    fn to_value(&self) -> Value<'_>;
}

impl ToValue for i64 {
    fn to_value(&self) -> Value<'_> {
        Value::Int(*self)
    }
}
impl ToValue for i32 {
    fn to_value(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for u32 {
    fn to_value(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for bool {
    fn to_value(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value<'_> {
        Value::Text(Cow::Borrowed(self))
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value<'_> {
        Value::Text(Cow::Borrowed(self))
    }
}
impl ToValue for [u8] {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(Cow::Borrowed(self))
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(Cow::Borrowed(self))
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value<'_> {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value<'_> {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}
impl ToValue for Value<'_> {
    fn to_value(&self) -> Value<'_> {
        match self {
            Value::Text(t) => Value::Text(Cow::Borrowed(t)),
            Value::Blob(b) => Value::Blob(Cow::Borrowed(b)),
            Value::Null => Value::Null,
            Value::Int(n) => Value::Int(*n),
            Value::Real(r) => Value::Real(*r),
        }
    }
}

/// The parameters of a statement: `args![a, b, c]`.
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        &[$(&$x as &dyn $crate::server::store::sql::ToValue),*][..]
    };
}
pub(crate) use args;

/// A column read into a Rust type.
pub trait FromValue: Sized {
    fn from_value(v: &Value<'_>) -> Result<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        match v {
            Value::Int(n) => Ok(*n),
            other => bail!("expected an integer, found {other:?}"),
        }
    }
}
impl FromValue for i32 {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        Ok(i32::try_from(i64::from_value(v)?)?)
    }
}
impl FromValue for u32 {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        Ok(u32::try_from(i64::from_value(v)?)?)
    }
}
impl FromValue for bool {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        match v {
            Value::Real(r) => Ok(*r),
            Value::Int(n) => Ok(*n as f64),
            other => bail!("expected a number, found {other:?}"),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        match v {
            Value::Text(t) => Ok(t.to_string()),
            other => bail!("expected text, found {other:?}"),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        match v {
            Value::Blob(b) => Ok(b.to_vec()),
            // SQLite may hand back text for a column declared BLOB if text was stored.
            Value::Text(t) => Ok(t.as_bytes().to_vec()),
            other => bail!("expected bytes, found {other:?}"),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value<'_>) -> Result<Self> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value<'static>>);

impl Row {
    /// Column `i` as a `T`; an error names the column if it does not fit.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| anyhow!("no column {i} (the row has {})", self.0.len()))?;
        T::from_value(v).with_context(|| format!("column {i}"))
    }

    /// Column `i` as it came.
    pub fn value(&self, i: usize) -> &Value<'static> {
        &self.0[i]
    }
}

/// Which engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How a transaction starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// Locks as it goes (SQLite: at its first write; PostgreSQL: row by row).
    Deferred,
    /// Serialised with every other immediate transaction before its first statement: what a
    /// transaction that reads and then writes on what it read needs.
    Immediate,
}

/// The advisory lock key of [`Begin::Immediate`] on PostgreSQL ("wp" + 1).
const IMMEDIATE_LOCK: i64 = 0x7770_0001;

/// PostgreSQL statements prepared per connection, by SQL text. The store's statements are a
/// fixed set (a few dozen); the cap only guards against a bug that would make them unbounded.
const PG_STATEMENT_CACHE: usize = 256;

/// SQLite statements kept prepared per connection (LRU): the store's fixed set of statements,
/// with room to spare.
const SQLITE_STATEMENT_CACHE: usize = 64;

/// One connection to the database. Statements take `&self`: the connection is used by one
/// thread at a time (a [`super::Store`] keeps it behind a mutex), and PostgreSQL's client needs
/// `&mut` for each statement, hence the cell.
pub struct Db {
    conn: RefCell<Conn>,
}

enum Conn {
    Sqlite(rusqlite::Connection),
    Pg(Box<PgConn>),
}

struct PgConn {
    /// Always Some until dropped (see the Drop impl).
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
}

impl Drop for PgConn {
    /// The client's own drop runs its runtime to say goodbye to the server, which panics on a
    /// worker of the server's runtime; [`super::blocking`] makes that allowed wherever the last
    /// handle to a connection happens to be dropped.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            super::blocking(move || drop(client));
        }
    }
}

impl Db {
    pub(crate) fn sqlite(conn: rusqlite::Connection) -> Db {
        conn.set_prepared_statement_cache_capacity(SQLITE_STATEMENT_CACHE);
        Db {
            conn: RefCell::new(Conn::Sqlite(conn)),
        }
    }

    pub(crate) fn postgres(client: postgres::Client) -> Db {
        Db {
            conn: RefCell::new(Conn::Pg(Box::new(PgConn {
                client: Some(client),
                statements: HashMap::new(),
            }))),
        }
    }

    pub fn backend(&self) -> Backend {
        match &*self.conn.borrow() {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Pg(_) => Backend::Postgres,
        }
    }

    /// Runs the SQLite connection directly (pragmas, backups); `None` on PostgreSQL.
    pub(crate) fn with_sqlite<R>(&self, f: impl FnOnce(&rusqlite::Connection) -> R) -> Option<R> {
        match &*self.conn.borrow() {
            Conn::Sqlite(c) => Some(f(c)),
            Conn::Pg(_) => None,
        }
    }

    /// Runs the PostgreSQL client directly (LISTEN, notifications); `None` on SQLite.
    pub(crate) fn with_postgres<R>(&self, f: impl FnOnce(&mut postgres::Client) -> R) -> Option<R> {
        match &mut *self.conn.borrow_mut() {
            Conn::Sqlite(_) => None,
            Conn::Pg(p) => Some(f(p.client())),
        }
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&self, sql: &str, args: &[&dyn ToValue]) -> Result<usize> {
        match &mut *self.conn.borrow_mut() {
            Conn::Sqlite(c) => {
                let vals: Vec<Value<'_>> = args.iter().map(|a| a.to_value()).collect();
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(vals.iter()))?)
            }
            Conn::Pg(p) => {
                let vals: Vec<Value<'_>> = args.iter().map(|a| a.to_value()).collect();
                let st = p.statement(sql)?;
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = vals
                    .iter()
                    .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                Ok(p.client().execute(&st, &refs)? as usize)
            }
        }
    }

    /// Runs a query; every row.
    pub fn query(&self, sql: &str, args: &[&dyn ToValue]) -> Result<Vec<Row>> {
        match &mut *self.conn.borrow_mut() {
            Conn::Sqlite(c) => {
                let vals: Vec<Value<'_>> = args.iter().map(|a| a.to_value()).collect();
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(vals.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(n);
                    for i in 0..n {
                        row.push(from_sqlite(r.get_ref(i)?));
                    }
                    out.push(Row(row));
                }
                Ok(out)
            }
            Conn::Pg(p) => {
                let vals: Vec<Value<'_>> = args.iter().map(|a| a.to_value()).collect();
                let st = p.statement(sql)?;
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = vals
                    .iter()
                    .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                let rows = p.client().query(&st, &refs)?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| Ok(r.try_get::<_, PgValue>(i)?.0))
                            .collect::<Result<Vec<_>>>()
                            .map(Row)
                    })
                    .collect()
            }
        }
    }

    /// Runs a query expected to return at most one row.
    pub fn query_opt(&self, sql: &str, args: &[&dyn ToValue]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// Runs a query expected to return exactly one row.
    pub fn query_one(&self, sql: &str, args: &[&dyn ToValue]) -> Result<Row> {
        self.query_opt(sql, args)?
            .ok_or_else(|| anyhow!("the query returned no row"))
    }

    /// Runs statements without parameters, separated by `;` (schema changes).
    pub fn batch(&self, sql: &str) -> Result<()> {
        match &mut *self.conn.borrow_mut() {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Pg(p) => Ok(p.client().batch_execute(sql)?),
        }
    }

    /// Runs `f` in one transaction: committed if it returns Ok, rolled back otherwise (also
    /// when the commit fails). Transactions do not nest.
    pub fn transaction<R>(&self, begin: Begin, f: impl FnOnce(&Db) -> Result<R>) -> Result<R> {
        match (self.backend(), begin) {
            (Backend::Sqlite, Begin::Deferred) => self.batch("BEGIN")?,
            (Backend::Sqlite, Begin::Immediate) => self.batch("BEGIN IMMEDIATE")?,
            (Backend::Postgres, Begin::Deferred) => self.batch("BEGIN")?,
            (Backend::Postgres, Begin::Immediate) => {
                self.batch("BEGIN")?;
                if let Err(e) =
                    self.query("SELECT pg_advisory_xact_lock(?1)", args![IMMEDIATE_LOCK])
                {
                    let _ = self.batch("ROLLBACK");
                    return Err(e);
                }
            }
        }
        match f(self) {
            Ok(r) => match self.batch("COMMIT") {
                Ok(()) => Ok(r),
                Err(e) => {
                    let _ = self.batch("ROLLBACK");
                    Err(e)
                }
            },
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Whether the connection is broken for good (PostgreSQL: the server closed it), so the
    /// caller should open a new one.
    pub fn is_closed(&self) -> bool {
        match &*self.conn.borrow() {
            Conn::Sqlite(_) => false,
            Conn::Pg(p) => p.client.as_ref().is_none_or(|c| c.is_closed()),
        }
    }
}

impl PgConn {
    fn client(&mut self) -> &mut postgres::Client {
        self.client
            .as_mut()
            .expect("a PostgreSQL connection is used only before it is dropped")
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        if self.statements.len() >= PG_STATEMENT_CACHE {
            self.statements.clear();
        }
        let st = self
            .client()
            .prepare(&pg_placeholders(sql))
            .with_context(|| format!("preparing: {}", first_line(sql)))?;
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim_start().lines().next().unwrap_or("")
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value<'static> {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Int(n),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(Cow::Owned(String::from_utf8_lossy(t).into_owned())),
        ValueRef::Blob(b) => Value::Blob(Cow::Owned(b.to_vec())),
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl postgres::types::ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        use postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                Type::FLOAT8 => (*n as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => n.to_string().to_sql(ty, out),
                _ => Err(format!("an integer cannot be sent as {ty}").into()),
            },
            Value::Real(r) => match *ty {
                Type::FLOAT8 => r.to_sql(ty, out),
                Type::FLOAT4 => (*r as f32).to_sql(ty, out),
                _ => Err(format!("a number cannot be sent as {ty}").into()),
            },
            Value::Text(t) => match *ty {
                Type::BYTEA => t.as_bytes().to_sql(ty, out),
                _ => t.as_ref().to_sql(ty, out),
            },
            Value::Blob(b) => match *ty {
                Type::BYTEA => b.as_ref().to_sql(ty, out),
                _ => Err(format!("bytes cannot be sent as {ty}").into()),
            },
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        // Checked per value in `to_sql`, against the type the server inferred.
        true
    }

    postgres::types::to_sql_checked!();
}

/// A column read from PostgreSQL.
struct PgValue(Value<'static>);

impl<'a> postgres::types::FromSql<'a> for PgValue {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        Ok(PgValue(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::OID => Value::Int(u32::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::NUMERIC => Value::Int(numeric_to_i64(raw)?),
            Type::BYTEA => Value::Blob(Cow::Owned(raw.to_vec())),
            _ => Value::Text(Cow::Owned(String::from_sql(ty, raw)?)),
        }))
    }

    fn from_sql_null(
        _: &postgres::types::Type,
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgValue(Value::Null))
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

/// The integer part of a NUMERIC in PostgreSQL's binary format: `SUM` of a bigint column is a
/// numeric. Format: ndigits, weight, sign, dscale (each 16 bits), then ndigits base-10000 digits,
/// the first worth 10000^weight.
fn numeric_to_i64(
    raw: &[u8],
) -> std::result::Result<i64, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> std::result::Result<u16, Box<dyn std::error::Error + Sync + Send>> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "a short numeric".into())
    };
    let ndigits = usize::from(word(0)?);
    let weight = word(1)? as i16;
    let sign = word(2)?;
    if sign == 0xC000 {
        return Err("NaN where an integer was expected".into());
    }
    let mut n: i64 = 0;
    for i in 0..ndigits {
        let power = i64::from(weight) - i as i64;
        if power < 0 {
            break; // the fraction: dropped
        }
        let digit = i64::from(word(4 + i)?);
        let scale = 10_000i64
            .checked_pow(u32::try_from(power)?)
            .ok_or("numeric out of range")?;
        n = digit
            .checked_mul(scale)
            .and_then(|d| n.checked_add(d))
            .ok_or("numeric out of range")?;
    }
    Ok(if sign == 0x4000 { -n } else { n })
}

/// `?N` placeholders → `$N`, outside quoted text.
pub fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted && chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// A migration written for SQLite, as PostgreSQL needs it: see the module comment.
pub fn pg_schema(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    for line in sql.split_inclusive('\n') {
        // Comments first: only the code part is translated.
        let (code, comment) = match line.find("--") {
            Some(i) => line.split_at(i),
            None => (line, ""),
        };
        let code = code
            .replace(
                "INTEGER PRIMARY KEY,",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,",
            )
            .replace("INTEGER", "BIGINT")
            .replace("BLOB", "BYTEA");
        out.push_str(&code);
        out.push_str(comment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_outside_quotes() {
        assert_eq!(
            pg_placeholders("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12"
        );
    }

    #[test]
    fn schema_types_are_translated_and_comments_kept() {
        let sql = "CREATE TABLE x (\n id INTEGER PRIMARY KEY, -- INTEGER here\n d BLOB NOT NULL,\n n INTEGER\n);";
        assert_eq!(
            pg_schema(sql),
            "CREATE TABLE x (\n id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, -- INTEGER here\n d BYTEA NOT NULL,\n n BIGINT\n);"
        );
    }

    #[test]
    fn numerics_decode_to_their_integer_part() {
        // 123456789 = 1·10000² + 2345·10000 + 6789: ndigits 3, weight 2, sign +, dscale 0.
        let raw = [0, 3, 0, 2, 0, 0, 0, 0, 0, 1, 0x09, 0x29, 0x1a, 0x85];
        assert_eq!(numeric_to_i64(&raw).unwrap(), 123_456_789);
        let neg = [0, 1, 0, 0, 0x40, 0, 0, 0, 0, 7];
        assert_eq!(numeric_to_i64(&neg).unwrap(), -7);
        // 0: no digits.
        assert_eq!(numeric_to_i64(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap(), 0);
        // 1.5: the fraction is dropped.
        let frac = [0, 2, 0, 0, 0, 0, 0, 1, 0, 1, 0x13, 0x88];
        assert_eq!(numeric_to_i64(&frac).unwrap(), 1);
        assert!(
            numeric_to_i64(&[0, 5, 0, 0]).is_err(),
            "short input is an error"
        );
    }

    #[test]
    fn sqlite_round_trips_values_and_transactions() {
        let db = Db::sqlite(rusqlite::Connection::open_in_memory().unwrap());
        db.batch("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")
            .unwrap();
        let none: Option<&str> = None;
        db.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3)",
            args![7i64, "x", b"\x00\x01".as_slice()],
        )
        .unwrap();
        db.execute("INSERT INTO t VALUES (?1, ?2, NULL)", args![8i64, none])
            .unwrap();
        let rows = db.query("SELECT a, b, c FROM t ORDER BY a", &[]).unwrap();
        assert_eq!(rows[0].get::<i64>(0).unwrap(), 7);
        assert_eq!(rows[0].get::<String>(1).unwrap(), "x");
        assert_eq!(rows[0].get::<Vec<u8>>(2).unwrap(), vec![0, 1]);
        assert_eq!(rows[1].get::<Option<String>>(1).unwrap(), None);
        assert!(rows[1].get::<String>(1).is_err(), "NULL is not text");
        let r: Result<()> = db.transaction(Begin::Immediate, |db| {
            db.execute("DELETE FROM t", &[])?;
            bail!("changed my mind")
        });
        assert!(r.is_err());
        assert_eq!(
            db.query("SELECT a FROM t", &[]).unwrap().len(),
            2,
            "rolled back"
        );
        db.transaction(Begin::Deferred, |db| {
            db.execute("DELETE FROM t WHERE a = 7", &[])
        })
        .unwrap();
        assert_eq!(
            db.query("SELECT a FROM t", &[]).unwrap().len(),
            1,
            "committed"
        );
    }
}
