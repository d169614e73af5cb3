//! L7 (HTTP/1.1) proxying.

pub mod chunked;
pub mod parse;
pub mod ratelimit;
pub mod route;
