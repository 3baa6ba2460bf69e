//! ContextOS agents as A2A agents: what the gateway's A2A endpoint says on the wire
//! ([`wire`], pure) and where its tasks live ([`sessions`]: Sessions in the Agent's namespace).
//! The endpoint itself is part of the gateway service (`service::a2a_api`).

pub mod sessions;
pub mod wire;
