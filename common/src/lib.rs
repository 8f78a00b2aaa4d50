//! Runtime pieces shared by the operator and the node agent.

pub mod events;
pub mod http;
pub mod lease;
pub mod logging;
