//! PostgreSQL: each service's own database ([`pool`]: creation, pool,
//! migrations, which errors are worth retrying) and keeping its bookkeeping
//! tables bounded ([`retention`]), and the gauges read from them
//! ([`gauges`]).

pub mod gauges;
pub mod pool;
pub mod retention;
pub mod statistics;
