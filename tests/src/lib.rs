//! Test support for gatehouse: an upstream that echoes what it receives, and helpers to start
//! the real gateway binary on free ports.

pub mod echo;
pub mod flow;
pub mod kube;
pub mod procs;
pub mod redis;
pub mod service;
