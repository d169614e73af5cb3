//! placeholder stub (being written)
#![allow(dead_code, unused_variables)]
pub struct RateLimiter { x: u8 }
impl RateLimiter {
    pub fn new(requests_per_second: f64, burst: u32) -> Self { todo!() }
    pub fn check(&self, ip: std::net::IpAddr, now_ns: u64) -> Result<(), u64> { todo!() }
}
