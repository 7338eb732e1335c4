//! Switchyard's PostgreSQL front end.
//!
//! Applications connect here as they would to PostgreSQL. In phase `passthrough` (the only one
//! built so far) every session is relayed to the OLD store unchanged; later phases mirror writes
//! to NEW and shift reads. Entry point: [`run`], with [`Listeners`] bound beforehand and a
//! [`shutdown::Shutdown`] to stop it.
//!
//! Layout: [`server`] accepts; `session` runs one client from startup to goodbye (client auth,
//! upstream login, relay); [`cancel`] routes CancelRequests; `admin` serves HTTP; [`metrics`]
//! defines the instruments.

mod admin;
pub mod cancel;
pub mod classify;
pub mod error;
pub mod metrics;
pub mod server;
pub mod shutdown;

mod session;

pub use error::StartError;
pub use server::{run, Listeners};
pub use shutdown::{Shutdown, ShutdownState, ShutdownTrigger};
