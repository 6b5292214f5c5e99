//! gatehouse custom resources and the pure `compile()` that turns them into a `GatewayConfig`.

pub mod compile;
pub mod config;
pub mod crdgen;
pub mod manifests;
pub mod publish;
pub mod resources;

pub use compile::{
    Compiled, Kind, Phase, Resources, Verdict, compile, compile_after, without_user_info,
};
pub use config::*;
pub use resources::*;
