//! Why the dual-write engine cannot start, and why a dual-write session ended abnormally.

use switchyard_config::Phase;
use switchyard_pgwire::ProtocolError;
use switchyard_store::StoreError;

/// Dual writes cannot start: a table, its schema or the side objects are not ready, or a store
/// cannot be reached. Each cause keeps its source, so a caller can tell a store that is down
/// (worth waiting for) from a configuration the operator must change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The phase is not built yet.
    #[error(
        "table {table}: phase {phase} is not supported yet (the proxy mirrors OLD to NEW in dual_write, shadow_read and read_shift)"
    )]
    UnsupportedPhase {
        /// The table.
        table: String,
        /// Its configured phase.
        phase: Phase,
    },
    /// A table's definition could not be read.
    #[error("table {table}: cannot read its definition on {store}: {source}")]
    Catalog {
        /// The table.
        table: String,
        /// `"OLD"` or `"NEW"`.
        store: &'static str,
        /// Why.
        source: StoreError,
    },
    /// A configured table does not exist on one of the stores.
    #[error("table {table} does not exist on {store}; create it there and run `switchyard prepare`")]
    MissingTable {
        /// The table.
        table: String,
        /// `"OLD"` or `"NEW"`.
        store: &'static str,
    },
    /// The two definitions of a table differ in a way the mirror cannot bridge.
    #[error("the stores' definitions differ; run `switchyard prepare` for the full report: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    /// `switchyard prepare` has not created a side object.
    #[error("{what} is missing on {store}; run `switchyard prepare --config FILE` first")]
    NotPrepared {
        /// `"OLD"` or `"NEW"`.
        store: &'static str,
        /// The object.
        what: String,
    },
    /// A store did not answer a start-up query.
    #[error("cannot reach {store}: {source}")]
    Unreachable {
        /// `"OLD"` or `"NEW"`.
        store: &'static str,
        /// Why.
        source: StoreError,
    },
    /// The authoritative store's functions (the writers the analyzer must know) could not be
    /// listed.
    #[error("cannot list the functions on the authoritative store: {0}")]
    Functions(StoreError),
    /// A task reading the tables' definitions ended without an answer (the runtime stopping).
    #[error("reading the tables' definitions was interrupted: {0}")]
    Interrupted(String),
}

/// Why a dual-write session ended abnormally. The proxy maps these onto its own session errors
/// (which add login and refusal causes) for the client's goodbye and the metrics.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's socket failed.
    #[error("client I/O: {0}")]
    ClientIo(std::io::Error),
    /// The authoritative store's socket failed.
    #[error("upstream I/O: {0}")]
    UpstreamIo(std::io::Error),
    /// The client broke the protocol.
    #[error("client protocol violation: {0}")]
    ClientProtocol(ProtocolError),
    /// The upstream server broke the protocol.
    #[error("upstream protocol violation: {0}")]
    UpstreamProtocol(ProtocolError),
    /// `[mirror] fault_injection` made the session die here (crash tests).
    #[error("injected fault: {0}")]
    Injected(&'static str),
}
