//! gatehouse operator: watches Api, Plan, Application and Subscription resources, writes their
//! status, creates client credentials, and publishes the compiled GatewayConfig to a ConfigMap
//! the gateway pods watch.

pub mod admin;
pub mod controller;
pub mod leader;
pub mod reconcile;
pub mod validate;
