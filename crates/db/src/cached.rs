//! Prepared-statement caching for statements diesel will not cache itself.
//!
//! diesel never caches `sql_query` statements or statements containing SQL
//! literals, since their text could differ from call to call. Then every
//! execution costs an extra round trip to prepare and a fresh parse and
//! plan in PostgreSQL. The hot-path statements here have the same text on
//! every call, so they are marked cacheable: the connection keeps one
//! prepared statement per distinct text (diesel keys its cache by the text
//! and the bind types).

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A statement whose SQL text is fixed, so its prepared form is reused.
/// Only for statements whose text does not grow with their input (no
/// `IN (…)` lists built per call): every distinct text stays in the cache.
#[derive(Debug, Clone, Copy)]
pub struct Cached<Q>(pub Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Cached<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Cached<Q> {
    type QueryId = ();
    // No static id: the cache is keyed by the SQL text instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Cached<Q> {
    type SqlType = Q::SqlType;
}

/// `.cached()` on any statement.
pub trait CacheStatement: Sized {
    fn cached(self) -> Cached<Self> {
        Cached(self)
    }
}

impl<T> CacheStatement for T {}
