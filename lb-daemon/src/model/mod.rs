//! The bottom layer: plain types, limits and conversions that every other module may use
//! and that use nothing else of this crate. What a service, a backend, a match, a
//! scheduler or a forwarding method is lives here; how they are read (`config`), planned
//! (`plan`), written (`dataplane`) and checked (`health`) lives above.
mod addr;
mod limits;
mod overrides;
mod ring;
mod service;

pub use addr::*;
pub use limits::*;
pub use overrides::*;
pub use ring::*;
pub use service::*;
