//! Cancel keys of live sessions, so a CancelRequest reaches the backend it names.
//!
//! Clients see their real backend's process id and secret key (BackendKeyData is forwarded
//! unchanged), so a CancelRequest arriving on a new connection carries an upstream key. The proxy
//! only forwards keys it handed out itself; an unknown key is dropped silently, as PostgreSQL does.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use switchyard_pgwire::startup::CancelKey;

/// Live sessions' cancel keys: the key the client knows, the upstream address and the key of
/// the backend the session runs on now (another one once the session moved to the other store
/// at cutover).
#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: DashMap<CancelKey, (SocketAddr, CancelKey)>,
}

/// Removes a key from the registry when its session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
}

impl CancelGuard {
    /// Points the session's key at another backend (`real`, at `upstream`): the session moved
    /// to the other store. The key stays registered (a new guard for the same key would be
    /// undone by the old one's drop).
    pub fn retarget(&self, upstream: SocketAddr, real: CancelKey) {
        self.registry.keys.insert(self.key.clone(), (upstream, real));
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.keys.remove(&self.key);
    }
}

impl CancelRegistry {
    /// Records a session's key (`key`, as the client knows it) and the backend's (`real`, at
    /// `upstream`); the returned guard removes it again. Registering the key again replaces it.
    pub fn register(self: &Arc<Self>, key: CancelKey, upstream: SocketAddr, real: CancelKey) -> CancelGuard {
        self.keys.insert(key.clone(), (upstream, real));
        CancelGuard {
            registry: Arc::clone(self),
            key,
        }
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Forwards a CancelRequest to the backend that owns `key`. Returns whether it was known.
    pub async fn forward(&self, key: &CancelKey) -> std::io::Result<bool> {
        let Some((addr, real)) = self.keys.get(key).map(|e| e.value().clone()) else {
            return Ok(false);
        };
        send_cancel_request(addr, &real).await?;
        Ok(true)
    }
}

pub(crate) use switchyard_store::wire::send_cancel_request;
