//! gatehouse gateway: an OAuth 2.0 authorization server for native apps in front of APIs, with
//! token checks, per-user rate limits and identity headers on every proxied request.

pub mod accounts;
pub mod admin;
pub mod cli;
pub mod client_ip;
pub mod deadline;
pub mod drain;
pub mod error;
pub mod headers;
pub mod kube_source;
pub mod oauth;
pub mod pages;
pub mod password;
pub mod proxy;
pub mod ratelimit;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod store;
pub mod tokens;
pub mod tunnel;
pub mod upstream;
pub mod upstream_dns;
