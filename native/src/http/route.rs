//! placeholder stub (being written)
#![allow(dead_code, unused_variables)]
use crate::balance::Pool;
use crate::config::RouteConfig;
use std::collections::HashMap;
use std::sync::Arc;
pub trait RequestView {
    fn host(&self) -> Option<&[u8]>;
    fn path(&self) -> &[u8];
    fn query(&self) -> Option<&[u8]>;
    fn header(&self, lower_name: &[u8]) -> Option<&[u8]>;
    fn cookie(&self, name: &[u8]) -> Option<&[u8]>;
    fn source_ip(&self) -> std::net::IpAddr;
}
pub fn find_cookie<'a>(cookie_header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> { todo!() }
pub fn find_query_param<'a>(query: &'a [u8], name: &[u8]) -> Option<&'a [u8]> { todo!() }
pub fn host_without_port(host: &[u8]) -> &[u8] { todo!() }
pub struct RouteTable { p: Vec<Arc<Pool>> }
impl RouteTable {
    pub fn build(routes: &[RouteConfig], pools: &HashMap<String, Arc<Pool>>) -> Result<RouteTable, String> { todo!() }
    pub fn select(&self, req: &impl RequestView) -> Option<(usize, &Arc<Pool>)> { todo!() }
    pub fn len(&self) -> usize { 0 }
    pub fn is_empty(&self) -> bool { true }
}
