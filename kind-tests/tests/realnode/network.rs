//! NetworkPolicy, enforced (next).
