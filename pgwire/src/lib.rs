//! Sans-I/O PostgreSQL wire protocol (version 3).
//!
//! This crate frames, parses and builds the messages of the PostgreSQL frontend/backend protocol
//! and runs the password-authentication exchanges. It performs no I/O: callers hand it byte
//! buffers and write out the bytes it returns. Messages from the client and from the server are
//! separate types ([`frontend`], [`backend`]), and the startup phase has its own ([`startup`]),
//! because a tag byte means one thing per direction.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>

pub mod auth;
pub mod backend;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;

mod error;
mod read;

pub use error::ProtocolError;
pub use frame::{FrameHeader, MessageLimits};
pub use sqlstate::SqlState;
