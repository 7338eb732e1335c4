//! Switchyard's PostgreSQL front end.
//!
//! Applications connect here as they would to PostgreSQL. With every table in phase
//! `passthrough`, sessions are relayed to the OLD store unchanged; when a table is in
//! `dual_write` (or `shadow_read`/`read_shift`), sessions run the dual-write relay (`switchyard_dualwrite`),
//! which mirrors row images of writes to NEW (the `switchyard-dualwrite` crate). Entry point: [`run`], with [`Listeners`] bound beforehand and a
//! [`shutdown::Shutdown`] to stop it.
//!
//! Layout: [`server`] accepts; `session` runs one client from startup to goodbye (client auth,
//! upstream login, relay); [`cancel`] routes CancelRequests; `admin` serves HTTP; [`metrics`]
//! defines the instruments.

mod admin;
mod auth;
mod authority;
pub mod cancel;
pub mod classify;
mod control_state;
mod drift_figures;
pub mod error;
mod io;
mod login_gate;
pub mod metrics;
mod net;
pub mod server;
pub mod shutdown;
mod state;
mod tls;

mod session;

pub use error::StartError;
pub use server::{run, run_with_reload, run_with_roles, Listeners};
pub use shutdown::{Shutdown, ShutdownState, ShutdownTrigger};
pub use switchyard_dualwrite::MirrorStats;
