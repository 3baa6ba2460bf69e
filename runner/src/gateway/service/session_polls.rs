//! The gateway service's watch of a run's Session (see [`crate::gateway::session_watch`]): the
//! API server is asked how the Session stands every few seconds while a remote agent's task is
//! followed — one read per followed call and period, and none for a call that ends sooner.

use std::{sync::Arc, time::Duration};

use crate::gateway::{
    session_watch::{Ends, SessionWatch, Sightings},
    tenancy::TenantView,
};

/// How often a followed call's Session is read, unless the service was told otherwise.
pub const EVERY: Duration = Duration::from_secs(5);

pub struct SessionPolls<T> {
    pub tenants: Arc<T>,
    pub namespace: String,
    pub session: String,
    /// The Session's uid as the run's RunContext names it.
    pub uid: Option<String>,
    pub every: Duration,
}

impl<T> std::fmt::Debug for SessionPolls<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPolls")
            .field("namespace", &self.namespace)
            .field("session", &self.session)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

impl<T: TenantView + 'static> SessionWatch for SessionPolls<T> {
    fn ended(&self) -> Ends {
        let tenants = self.tenants.clone();
        let (namespace, session, uid, every) = (
            self.namespace.clone(),
            self.session.clone(),
            self.uid.clone(),
            self.every,
        );
        Box::pin(async move {
            let mut sightings = Sightings::default();
            loop {
                tokio::time::sleep(every).await;
                match tenants.session_state(&namespace, &session).await {
                    Ok(state) => {
                        if let Some(ended) = sightings.look(&state, uid.as_deref()) {
                            return ended;
                        }
                    }
                    // Unread, the Session is taken to stand: the call goes on as it would have.
                    Err(error) => {
                        tracing::debug!(%namespace, %session, %error, "cannot read the Session of a followed call");
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{
        session_watch::{SessionEnded, SessionState},
        tenancy::StaticTenants,
    };

    #[tokio::test]
    async fn the_watch_ends_once_the_api_server_says_the_session_did() {
        let tenants = StaticTenants::default();
        let watch = SessionPolls {
            tenants: Arc::new(tenants.clone()),
            namespace: "shop".into(),
            session: "refunds".into(),
            uid: Some("u1".into()),
            every: Duration::from_millis(10),
        };
        tenants.set_session(
            "shop",
            "refunds",
            SessionState::Present {
                uid: Some("u1".into()),
                cancel: false,
                finished: None,
            },
        );
        let standing = tokio::time::timeout(Duration::from_millis(200), watch.ended()).await;
        assert!(standing.is_err(), "a Session that stands never ends the watch");
        let ended = watch.ended();
        tenants.set_session(
            "shop",
            "refunds",
            SessionState::Present {
                uid: Some("u1".into()),
                cancel: true,
                finished: None,
            },
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), ended).await;
        assert_eq!(ended.ok(), Some(SessionEnded::Cancelled));
    }
}
