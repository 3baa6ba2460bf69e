//! Test harness for running ContextOS against a real Kubernetes API server: the local control
//! plane (`testenv/`), the process node, and per-test namespaces.
